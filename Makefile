# Two set-up commands on a fresh machine (see README.md):
#   make demo   - install, then run the batch job end to end on the embedded default
#   make test   - install, then run the test suite (what .ci/run calls)
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: demo test install system-deps bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

install: $(VENV)/.installed

# System packages from Debian, installed when missing (root only; without them the tests that
# need them skip with a reason): headless Chromium renders the HTML reports in their tests,
# redis-server holds the online endpoint's reputation state.
system-deps:
	@missing=""; for cmd in chromium redis-server; do command -v $$cmd >/dev/null 2>&1 || missing="$$missing $$cmd"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	  else echo "not installed:$$missing (the tests that need them will skip)"; fi; \
	fi

demo: install system-deps
	$(VENV)/bin/twostream score

test: install system-deps
	$(PY) -m pytest

bench: install
	$(PY) benchmarks/comparator_throughput.py

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
