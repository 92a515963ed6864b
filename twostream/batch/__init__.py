"""The batch job without Ray: :mod:`~twostream.batch.planning` (input shards and their rows),
:mod:`~twostream.batch.manifest`, :mod:`~twostream.batch.stages` (the phase-1 stage callables),
:mod:`~twostream.batch.detector` (the query detector over the run, its window carried across runs),
:mod:`~twostream.batch.reputation` (the reputation reduce and responses) and
:mod:`~twostream.batch.outputs` (schemas, layout, commits, summary). ``jobs/score.py`` places
these on Ray."""
