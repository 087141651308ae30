# Ferry developer entry points. `make demo` and `make test` bootstrap everything
# they need on a fresh machine; heavy one-time work is cached under
# $(FERRY_CACHE) (default ~/.cache/ferry), keyed by pinned versions.

SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
PY := .venv/bin/python
PYTEST_ARGS ?=

.PHONY: setup lock envtest kwok node node-test crds protos generate test vllm-test sglang-test test-py312 unit integration e2e scale lint plots demo demo-rl clean chart-test

setup: .venv/.ferry-deps

.venv/.ferry-deps: requirements.lock pyproject.toml crds/pyproject.toml operator/pyproject.toml \
		agent/pyproject.toml tools/pyproject.toml hack/setup-venv.sh
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

# kubelet and kube-proxy for the real node (`ferry dev up --node`, tests/node), built
# once like kube-apiserver; containerd, runc and the CNI plugins come from Debian.
node:
	@hack/node.sh

crds: setup
	$(PY) -m ferry_api.generate

protos: setup
	$(PY) -m ferry_agent.proto.build

generate: crds protos

# The pure core is type-checked; adapters around kopf, grpc and NIXL are not (yet).
MYPY_CORE := crds/ferry_api operator/ferry_operator/handlers operator/ferry_operator/planner.py \
	operator/ferry_operator/conditions.py operator/ferry_operator/injection.py \
	agent/ferry_agent/planner.py agent/ferry_agent/layout.py agent/ferry_agent/engines/layout.py \
	agent/ferry_agent/fallback.py agent/ferry_agent/peerid.py agent/ferry_agent/k8s/peerpolicy.py

lint: setup
	$(PY) -m ruff check crds operator agent tools tests docs/bench
	$(PY) -m ruff format --check crds operator agent tools tests docs/bench
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

# The real-node tier: the injected sidecar as containers on a real kubelet (`make test`
# runs it too; it skips, saying why, where the host cannot run containers).
node-test: setup
	FERRY_ENVTEST_DIR="$$(hack/envtest.sh | tail -n1)" FERRY_KWOK_DIR="$$(hack/kwok.sh | tail -n1)" \
		FERRY_NODE_DIR="$$(hack/node.sh | tail -n1)" $(PY) -m pytest tests/node $(PYTEST_ARGS)

# vLLM's own environment (hack/setup-vllm.sh: once, ~9.5 GB, ~5.5 min cold); if it cannot be
# built, tests/e2e/engines/test_vllm.py skips naming the failure.
VLLM_PY = $$(hack/setup-vllm.sh 2>&1 | tail -n1)
# SGLang's own environment (hack/setup-sglang.sh: once per SGLang version, cached outside
# the checkout; docs/sglang.md gives its size and time). If it cannot be built,
# tests/e2e/engines/test_sglang.py skips naming the failure.
SGLANG_PY = $$(hack/setup-sglang.sh 2>/tmp/ferry-setup-sglang.log | tail -n1 || tail -n1 /tmp/ferry-setup-sglang.log)

test: setup
	FERRY_ENVTEST_DIR="$$(hack/envtest.sh | tail -n1)" FERRY_KWOK_DIR="$$(hack/kwok.sh | tail -n1)" \
		FERRY_NODE_DIR="$$(hack/node.sh | tail -n1)" FERRY_VLLM_PYTHON="$(VLLM_PY)" FERRY_SGLANG_PYTHON="$(SGLANG_PY)" \
		$(PY) -m pytest tests $(PYTEST_ARGS)

vllm-test: setup
	FERRY_VLLM_PYTHON="$(VLLM_PY)" $(PY) -m pytest tests/e2e/engines/test_vllm.py $(PYTEST_ARGS)

sglang-test: setup
	FERRY_SGLANG_PYTHON="$(SGLANG_PY)" $(PY) -m pytest tests/e2e/engines/test_sglang.py $(PYTEST_ARGS)

# The unit and API-validation tests under Python 3.12 in a second environment
# (cached like the first). PY312 names the interpreter.
PY312 ?= $(shell for p in $$(command -v python3.12) $$HOME/.pyenv/versions/3.12.*/bin/python3.12; do \
	"$$p" -c '' 2>/dev/null && { echo "$$p"; break; }; done)
test-py312:
	@test -n "$(PY312)" || { echo "no python3.12 found; set PY312=/path/to/python3.12"; exit 1; }
	FERRY_PYTHON="$(PY312)" FERRY_VENV=.venv312 hack/setup-venv.sh
	FERRY_ENVTEST_DIR="$$(hack/envtest.sh | tail -n1)" .venv312/bin/python -m pytest tests/unit tests/integration/test_validation.py $(PYTEST_ARGS)

# `make demo NODE=1`: instead of the run-through, leave a real-node cluster running with
# Ferry installed by helm, a WeightSource and a trainer + an inference pod (`ferry dev up
# --node --ferry`; root and Debian's containerd, runc, containernetworking-plugins,
# iptables); it prints what to run next. `ferry dev down` stops it.
NODE ?=
demo: setup
ifeq ($(NODE),)
	FERRY_ENVTEST_DIR="$$(hack/envtest.sh | tail -n1)" $(PY) -m ferry_dev.demo
else
	FERRY_ENVTEST_DIR="$$(hack/envtest.sh | tail -n1)" FERRY_KWOK_DIR="$$(hack/kwok.sh | tail -n1)" \
		FERRY_NODE_DIR="$$(hack/node.sh | tail -n1)" .venv/bin/ferry dev up --node --ferry --sources 1 --targets 1
endif

# An RL loop on the local cluster: an HF trainer publishes after each optimizer step,
# a RefitJob refits N inference replicas (bound HF models); prints the per-step latency.
RL_ARGS ?=
demo-rl: setup
	FERRY_ENVTEST_DIR="$$(hack/envtest.sh | tail -n1)" $(PY) examples/rl/rl_loop.py $(RL_ARGS)

clean:
	rm -rf .venv .venv-sglang .pytest_cache build *.egg-info
