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

# Headless Chromium renders the audit report in its test; installed from Debian's packages
# when missing (root only; without it that test skips with a reason).
system-deps:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 \
	  && (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
	  || echo "chromium not installed: the report screenshot test will skip"; }

demo: install
	$(VENV)/bin/twostream score

test: install system-deps
	$(PY) -m pytest

bench: install
	$(PY) benchmarks/comparator_throughput.py

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
