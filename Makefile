# The two commands a newcomer needs: `make run` and `make test`. Both create the environment when
# it is absent (a bootstrap venv holding uv, then .venv from the committed uv.lock).
PYTHON ?= python3
HOST ?= 127.0.0.1
PORT ?= 8000
UV_VERSION ?= 0.13.9
BOOT := .bootstrap
UV := $(BOOT)/bin/uv
VENV := .venv
STAMP := $(VENV)/.synced

.PHONY: run test lint typecheck unit stress demo bench clean

$(UV):
	$(PYTHON) -m venv $(BOOT)
	$(BOOT)/bin/python -m pip install --quiet "uv==$(UV_VERSION)"

$(STAMP): $(UV) uv.lock pyproject.toml packages/api/pyproject.toml packages/fakehub/pyproject.toml
	$(UV) sync --frozen --python $(PYTHON)
	@touch $(STAMP)

run: $(STAMP)
	$(VENV)/bin/uvicorn api.app:app --host $(HOST) --port $(PORT)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

typecheck: $(STAMP)
	$(VENV)/bin/mypy packages/api/src packages/fakehub/src packages/api/tests packages/fakehub/tests bench conftest.py

unit: $(STAMP)
	$(VENV)/bin/pytest -q

test: lint typecheck unit

# Slow tests (longer fuzzing, repeated kill -9, heavier load): not part of `make test`.
stress: $(STAMP)
	$(VENV)/bin/pytest -q -m stress packages/api/tests/stress

# An offline demo: the fake hub with sample repos on :8900 and the service pointed at it on :8000.
demo: $(STAMP)
	@mkdir -p .demo
	$(VENV)/bin/python -m fakehub --repos .demo/repos --port 8900 --samples & \
	  trap "kill $$!" EXIT; sleep 2; \
	  HF_ENDPOINT=http://127.0.0.1:8900 HF_HUB_CACHE=$(CURDIR)/.demo/cache \
	  $(VENV)/bin/uvicorn api.app:app --host $(HOST) --port $(PORT)

# Benchmarks (not part of `make test`): each prints medians and ratios against a baseline measured
# in the same run. The first run makes the benchmark repos (about 3 GiB) in bench/.data.
bench: $(STAMP)
	cd bench && ../$(VENV)/bin/python throughput.py
	cd bench && ../$(VENV)/bin/python responsiveness.py
	cd bench && ../$(VENV)/bin/python status_list.py
	cd bench && ../$(VENV)/bin/python cancel.py
	cd bench && ../$(VENV)/bin/python memory.py

clean:
	rm -rf $(BOOT) $(VENV) .demo bench/.data .mypy_cache .ruff_cache .pytest_cache
