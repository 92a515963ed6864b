"""The online endpoint without Ray: API models, request parsing and limits, metrics and the
reputation store. ``jobs/serve.py`` places these on Ray Serve."""
