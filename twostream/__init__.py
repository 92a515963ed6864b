"""twostream: catch adversarial images by two-stream agreement and per-source reputation."""

__version__ = "0.1.0"
