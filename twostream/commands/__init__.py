"""One module per ``twostream`` subcommand (see :mod:`twostream.cli`)."""
