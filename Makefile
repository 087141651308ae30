# Ferry developer entry points. `make demo` and `make test` bootstrap everything
# they need on a fresh machine; heavy one-time work is cached under
# $(FERRY_CACHE) (default ~/.cache/ferry), keyed by pinned versions.

SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
PY := .venv/bin/python
PYTEST_ARGS ?=

.PHONY: setup lock envtest kwok crds protos generate test test-py312 unit integration e2e scale lint plots demo clean chart-test

setup: .venv/.ferry-deps

.venv/.ferry-deps: requirements.lock pyproject.toml hack/setup-venv.sh
	hack/setup-venv.sh

# Re-resolve the lock from requirements.in (needs the package index).
lock:
	rm -rf /tmp/ferry-lock && python3.11 -m venv /tmp/ferry-lock
	/tmp/ferry-lock/bin/pip install -q -r requirements.in
	/tmp/ferry-lock/bin/pip freeze --exclude-editable | sort > requirements.lock

envtest:
	@hack/envtest.sh

# kube-controller-manager, kube-scheduler, kwok and etcdctl for the kwok cluster
# (`ferry dev up --kwok`, tests/scale, `ferry bench control-plane`).
kwok:
	@hack/kwok.sh

crds: setup
	$(PY) -m ferry_api.generate

protos: setup
	$(PY) -m ferry_agent.proto.build

generate: crds protos

# The pure core is type-checked; adapters around kopf, grpc and NIXL are not (yet).
MYPY_CORE := crds/ferry_api operator/ferry_operator/handlers operator/ferry_operator/planner.py \
	operator/ferry_operator/conditions.py operator/ferry_operator/injection.py \
	agent/ferry_agent/planner.py agent/ferry_agent/layout.py

lint: setup
	$(PY) -m ruff check crds operator agent tests docs/bench
	$(PY) -m mypy $(MYPY_CORE)

# Redraw docs/bench/*.png from the committed benchmark JSON (a test fails when stale).
plots: setup
	$(PY) docs/bench/plot.py
	$(PY) docs/bench/fanout_plot.py

unit: setup
	$(PY) -m pytest tests/unit $(PYTEST_ARGS)

integration: setup
	FERRY_ENVTEST_DIR="$$(hack/envtest.sh | tail -n1)" $(PY) -m pytest tests/integration $(PYTEST_ARGS)

# helm lint, helm template and a server-side dry-run of charts/ferry against the
# test control plane (helm is built once by hack/helm.sh; `make test` runs it too).
chart-test: setup
	FERRY_ENVTEST_DIR="$$(hack/envtest.sh | tail -n1)" $(PY) -m pytest tests/integration/test_chart.py $(PYTEST_ARGS)

e2e: setup
	FERRY_ENVTEST_DIR="$$(hack/envtest.sh | tail -n1)" $(PY) -m pytest tests/e2e $(PYTEST_ARGS)

# A RefitJob over 100 and 1,000 simulated targets on kwok GPU nodes (`make test` runs it too).
scale: setup
	FERRY_ENVTEST_DIR="$$(hack/envtest.sh | tail -n1)" FERRY_KWOK_DIR="$$(hack/kwok.sh | tail -n1)" \
		$(PY) -m pytest tests/scale $(PYTEST_ARGS)

test: setup
	FERRY_ENVTEST_DIR="$$(hack/envtest.sh | tail -n1)" FERRY_KWOK_DIR="$$(hack/kwok.sh | tail -n1)" \
		$(PY) -m pytest tests $(PYTEST_ARGS)

# The unit and API-validation tests under Python 3.12 in a second environment
# (cached like the first). PY312 names the interpreter.
PY312 ?= $(shell for p in $$(command -v python3.12) $$HOME/.pyenv/versions/3.12.*/bin/python3.12; do \
	"$$p" -c '' 2>/dev/null && { echo "$$p"; break; }; done)
test-py312:
	@test -n "$(PY312)" || { echo "no python3.12 found; set PY312=/path/to/python3.12"; exit 1; }
	FERRY_PYTHON="$(PY312)" FERRY_VENV=.venv312 hack/setup-venv.sh
	FERRY_ENVTEST_DIR="$$(hack/envtest.sh | tail -n1)" .venv312/bin/python -m pytest tests/unit tests/integration/test_validation.py $(PYTEST_ARGS)

demo: setup
	FERRY_ENVTEST_DIR="$$(hack/envtest.sh | tail -n1)" $(PY) -m ferry_operator.dev.demo

clean:
	rm -rf .venv .pytest_cache build *.egg-info
