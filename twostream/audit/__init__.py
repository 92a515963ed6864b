"""The upload-log audit: log reading, the catalogue of known images, the per-source replay,
the what-if sweep, the Parquet outputs and the HTML report."""
