"""The one reader of upload records, shared by batch manifests and audited upload logs:
``formats`` (the format from the file name, compression), ``columns`` (the one table of column
names), ``blocks`` (a text file a block of lines at a time, bad lines, what readers yield), one
file per format (``delimited``: CSV/TSV, ``jsonl``, ``parquet``, ``clf``: web-server access
logs) and ``reader`` (one entry point). Timestamps are read by :mod:`twostream.core.timestamps`.
Each caller decides what a bad line means: a manifest refuses it naming its line, the audit lists
it. See docs/records.md for the table of what is accepted."""
