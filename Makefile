# Both targets bootstrap .venv from scratch on a fresh machine and are quick once it is set up.
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
PIP    := $(PY) -m pip -q --disable-pip-version-check

.PHONY: test demo lint install clean bench-cpu chromium

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install --upgrade pip
	# A bare `torch` requirement pulls a multi-GB CUDA build: put the CPU build in first.
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install torch==2.13.0 \
		|| $(PIP) install torch --index-url https://download.pytorch.org/whl/cpu
	$(PIP) install -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

lint: $(STAMP)
	$(VENV)/bin/ruff format --check gapnet tests benchmarks
	$(VENV)/bin/ruff check gapnet tests benchmarks
	$(VENV)/bin/mypy

# The browser tests (marker `browser`, part of the suite) drive headless Chromium: Debian's
# `chromium` package, installed here when no Chromium is found (GAPNET_CHROMIUM names another).
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

chromium:
	@[ -n "$$GAPNET_CHROMIUM" ] || command -v chromium >/dev/null 2>&1 \
		|| command -v chromium-browser >/dev/null 2>&1 \
		|| { command -v apt-get >/dev/null 2>&1 \
			&& $(SUDO) apt-get update -qq \
			&& DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq chromium; } \
		|| { echo "make: Chromium not found and not installed (apt-get install chromium): install it, or set" \
			"GAPNET_CHROMIUM to its executable (the browser tests need it)" >&2; exit 1; }

test: lint chromium
	$(PY) -m pytest -q

demo: $(STAMP)
	$(VENV)/bin/gapnet demo

bench-cpu: $(STAMP)
	$(PY) benchmarks/bench_ops.py --device cpu

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis
