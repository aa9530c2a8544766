# The two commands a newcomer needs: `make run` and `make test`. Both create the environment when
# it is absent (a bootstrap venv holding uv, then .venv from the committed uv.lock).
PYTHON ?= python3
HOST ?= 127.0.0.1
PORT ?= 8000
HUB_PORT ?= 8900
UV_VERSION ?= 0.13.9
BOOT := .bootstrap
UV := $(BOOT)/bin/uv
VENV := .venv
STAMP := $(VENV)/.synced
# A fleet (MODELS_RAY_ADDRESS set) runs with the api[fleet] extra: Ray.
RUN_EXTRA := $(if $(MODELS_RAY_ADDRESS),--package api --extra fleet,)
RUN_STAMP := $(VENV)/.synced-runtime$(if $(MODELS_RAY_ADDRESS),-fleet,)

.PHONY: run install test lint typecheck unit steady stress demo fleet-demo bench clean browser-deps screenshot

$(UV):
	$(PYTHON) -m venv $(BOOT)
	$(BOOT)/bin/python -m pip install --quiet "uv==$(UV_VERSION)"

$(STAMP): $(UV) uv.lock pyproject.toml packages/api/pyproject.toml packages/fakehub/pyproject.toml
	$(UV) sync --frozen --compile-bytecode --python $(PYTHON)
	@touch $(STAMP)

# `make run` installs what the service needs to run and nothing more (no test tools); it leaves
# a test environment that is already there as it is.
$(RUN_STAMP): $(UV) uv.lock pyproject.toml packages/api/pyproject.toml packages/fakehub/pyproject.toml
	$(UV) sync --frozen --compile-bytecode --no-dev --inexact $(RUN_EXTRA) --python $(PYTHON)
	@touch $(RUN_STAMP)

run: $(RUN_STAMP)
	$(VENV)/bin/uvicorn api.app:app --host $(HOST) --port $(PORT)

# A production machine: the package and its runtime dependencies only, exactly (removes the rest).
install: $(UV)
	$(UV) sync --frozen --no-dev --python $(PYTHON)
	@rm -f $(STAMP)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

typecheck: $(STAMP)
	$(VENV)/bin/mypy packages/api/src packages/fakehub/src packages/api/tests packages/fakehub/tests bench scripts conftest.py

# The suite starts about a hundred Python processes (services, zygotes, workers, xdist's own):
# each imports FastAPI and huggingface_hub. With PYTHONDONTWRITEBYTECODE set (some machines set it
# for every process) none of them finds a compiled module, and each compiles them all again:
# 1.45 s of CPU to import the service instead of 0.6 s. The suite writes its caches (git ignores
# them, under .venv and the packages) whatever the machine says.
PYTEST := env -u PYTHONDONTWRITEBYTECODE $(VENV)/bin/pytest

unit: $(STAMP)
	$(PYTEST) -q

test: lint typecheck browser-deps unit

# The browser tests drive Debian's chromium (a browser downloaded at install time would need a
# host only the package registries stand in for). Installed here when run as root, as CI does;
# elsewhere the browser tests are skipped, saying so.
browser-deps:
	@if command -v chromium >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
	    --no-install-recommends chromium fonts-dejavu-core >/dev/null; } \
	  || echo "could not install chromium with apt: the browser tests will be skipped"; \
	else echo "chromium is not installed and this is not root: the browser tests will be skipped"; fi

# The screenshot of the operator's page in docs/using.md, from the browser test that takes it.
screenshot: $(STAMP) browser-deps
	MODELS_SCREENSHOT=$(CURDIR)/docs/operator-page.png $(PYTEST) -q -n 0 \
	  packages/api/tests/browser -k new_user

# Steadiness: the whole suite 5 times in a row while two busy loops keep both cores loaded.
steady: $(STAMP)
	@(while :; do :; done) & hog1=$$!; (while :; do :; done) & hog2=$$!; \
	  trap "kill $$hog1 $$hog2" EXIT; \
	  for run in 1 2 3 4 5; do echo "== run $$run of 5, both cores kept busy"; \
	    $(PYTEST) -q || exit 1; done

# Slow tests (longer fuzzing, repeated kill -9, heavier load): not part of `make test`.
stress: $(STAMP)
	$(PYTEST) -q -n 0 -m stress packages/api/tests/stress

# An offline demo: the fake hub with sample repos on :$(HUB_PORT) and the service pointed at it on
# :$(PORT); a busy port fails loudly, and both stop together (scripts/demo.py).
demo: $(STAMP)
	$(VENV)/bin/python scripts/demo.py --host $(HOST) --port $(PORT) --hub-port $(HUB_PORT)

# The same with a fleet: a Ray cluster of 3 nodes on this machine, the service over all of them.
fleet-demo: $(STAMP)
	$(VENV)/bin/python scripts/demo.py --host $(HOST) --port $(PORT) --hub-port $(HUB_PORT) --fleet 3

# Benchmarks (not part of `make test`): each prints medians and ratios against a baseline measured
# in the same run. The first run makes the benchmark repos (about 3 GiB) in bench/.data.
bench: $(STAMP)
	cd bench && ../$(VENV)/bin/python throughput.py
	cd bench && ../$(VENV)/bin/python responsiveness.py
	cd bench && ../$(VENV)/bin/python status_list.py
	cd bench && ../$(VENV)/bin/python cancel.py
	cd bench && ../$(VENV)/bin/python memory.py
	cd bench && ../$(VENV)/bin/python selection.py
	cd bench && ../$(VENV)/bin/python link.py
	cd bench && ../$(VENV)/bin/python resume.py
	cd bench && BENCH_XET=1 ../$(VENV)/bin/python resume.py
	cd bench && ../$(VENV)/bin/python xet_tuning.py
	cd bench && ../$(VENV)/bin/python bandwidth.py
	cd bench && ../$(VENV)/bin/python anchored.py

clean:
	rm -rf $(BOOT) $(VENV) .demo bench/.data .mypy_cache .ruff_cache .pytest_cache
