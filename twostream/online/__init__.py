"""The online endpoint without Ray: ``api`` (API models, the classify answer from a ScoredBatch
row), ``http`` (request checks and limits, the streaming multipart reader), ``models`` (both
topologies' model work on the scoring core), ``answers`` (a stream replica's answer, joined into
a ScoredBatch), ``redis_store`` (Algorithm 2 in Redis, one atomic script per image),
``redis_server`` (the embedded redis-server), ``metrics`` (Prometheus). ``jobs/serve.py``
places these on Ray Serve."""
