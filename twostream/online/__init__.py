"""The online endpoint without Ray: ``api`` (API models, the classify answer from a ScoredBatch
row), ``http`` (request checks and limits), ``answers`` (a stream replica's answer, joined into a
ScoredBatch), ``metrics`` (Prometheus), ``reputation_store`` (Algorithm 2 in arrival order,
snapshots). ``jobs/serve.py`` places these on Ray Serve."""
