"""Ray entry points (`python -m jobs.<name>`), meant for `ray job submit`."""
