"""The batch job without Ray: input planning and reading, manifests, the stage callables,
output schemas, the reputation reduce and resume. ``jobs/score.py`` places these on Ray."""
