"""The upload-log audit (docs/audit.md): :mod:`~twostream.audit.logread` (log formats, column
mapping, bad lines), :mod:`~twostream.audit.catalogue` (the known images: scores and files),
:mod:`~twostream.audit.replay` (spill files and the one Algorithm-2 replay, what-if included),
:mod:`~twostream.audit.clusters` (the query detector over the log's images: clusters of
near-identical uploads and their sources),
:mod:`~twostream.audit.outputs` (schemas, sinks, result types), :mod:`~twostream.audit.run`
(``run_audit``), :mod:`~twostream.audit.report` (report.html) and :mod:`~twostream.audit.flags`
(the command-line flags shared by ``twostream audit`` and ``jobs.audit``)."""
