"""The Ray applications and nothing else: ``jobs.score`` (batch job on Ray Data), ``jobs.serve``
(Ray Serve app), ``jobs.audit`` (audit with scoring in Ray tasks), ``jobs.evaluate`` (the
evaluation grid). Each places the Ray-free stages of :mod:`twostream` on Ray; ``python -m
jobs.<name>`` is meant for ``ray job submit``. :func:`jobs.ray_cluster.connect` is the one way
they (and the CLI) connect to or start Ray."""
