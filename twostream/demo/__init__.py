"""The embedded demo (``make demo``): photographs the package may redistribute (:mod:`.photos`)
and the upload set built from them, with each source's role as ground truth (:mod:`.sample`)."""
