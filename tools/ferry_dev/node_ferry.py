"""Ferry on the real node, as a user installs and uses it: `helm install` of charts/ferry
with the images built here, and engine pods as users write them (labelled for
injection; the webhook adds the agent). Shared by tests/node and `ferry dev up --node`.

The engine containers run the project's engine client (`ferry_agent.client`) in host
memory from the agent image itself: it carries numpy but not torch, so the client maps
the slabs as byte views (`EngineClient.connect(views="bytes")`). No other image is
built: the engine is a short script given as the container's command.
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

from . import manifests
from .paths import REPO_ROOT

NAMESPACE = "ferry-system"
RELEASE = "ferry"
GROUP, VERSION = "ferry.dev", "v1alpha1"
PY = "/usr/local/bin/python3.11"

# A trainer: declares a small transformer-like layout, writes deterministic bytes,
# publishes, prints the sha256 of all of them, then serves until it is stopped.
SOURCE_ENGINE = """\
import hashlib, os, signal, sys, time
import numpy as np
from ferry_agent.client import EngineClient
signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
version = os.environ.get("WEIGHTS_VERSION", "1")
layout = {f"layers.{i}.weight": ("bfloat16", (256, 1024)) for i in range(8)}
layout.update({f"layers.{i}.norm": ("float32", (1024,)) for i in range(8)})
c = EngineClient.connect(views="bytes")
views = c.declare(layout)
with c.writing(version):
    for i, name in enumerate(sorted(views)):
        views[name][:] = np.random.default_rng(i).integers(0, 256, views[name].size, dtype=np.uint8)
h = hashlib.sha256()
for name in sorted(views):
    h.update(views[name].tobytes())
print(f"published {version} sha256:{h.hexdigest()} bytes={sum(v.size for v in views.values())}", flush=True)
while True:
    time.sleep(3600)
"""

# An inference server: waits for the agent's refit notice, stops reading, acks, and
# after the pull prints the version it now serves and the sha256 of its bytes.
TARGET_ENGINE = """\
import hashlib, signal, sys
from ferry_agent.client import EngineClient
signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
c = EngineClient.connect(views="bytes")
print("waiting for a refit", flush=True)
while True:
    refit = c.wait_refit(timeout=5)
    if refit is None:
        continue
    refit.ack()
    version, ok = refit.wait_done(timeout=600)
    views = c.attach()
    h = hashlib.sha256()
    for name in sorted(views):
        h.update(views[name].tobytes())
    print(f"served {version} ok={ok} sha256:{h.hexdigest()}", flush=True)
"""


def helm_binary() -> str:
    out = subprocess.run(
        [str(REPO_ROOT / "hack" / "helm.sh")], check=True, capture_output=True, text=True
    )
    return out.stdout.strip().splitlines()[-1]


def _split(ref: str) -> tuple[str, str]:
    repo, tag = ref.rsplit(":", 1)
    return repo, tag


def helm_install(
    kubeconfig: Path,
    operator_ref: str,
    agent_ref: str,
    *,
    workload_ns: str = "default",
    timeout_s: int = 180,
) -> subprocess.CompletedProcess:
    """`helm install ferry charts/ferry` with the local images, agents in host memory (no
    GPU on the node), UCX rails off, small sidecar requests (two cores), and the agent
    ClusterRole bound to `workload_ns`'s default ServiceAccount."""
    op_repo, op_tag = _split(operator_ref)
    ag_repo, ag_tag = _split(agent_ref)
    return subprocess.run(
        [
            helm_binary(),
            "--kubeconfig",
            str(kubeconfig),
            "install",
            RELEASE,
            str(REPO_ROOT / "charts" / "ferry"),
            "-n",
            NAMESPACE,
            "--create-namespace",
            "--wait",
            "--timeout",
            f"{timeout_s}s",
            "--set",
            f"image.repository={op_repo},image.tag={op_tag},image.pullPolicy=Never",
            "--set",
            f"agent.image.repository={ag_repo},agent.image.tag={ag_tag}",
            "--set",
            "agent.memory=host,agent.rails=off",
            "--set",
            "agent.resources.requests.cpu=50m,agent.resources.requests.memory=64Mi",
            "--set",
            f"agent.rbac.bindings[0].namespace={workload_ns},agent.rbac.bindings[0].serviceAccount=default",
        ],
        capture_output=True,
        text=True,
        timeout=timeout_s + 60,
    )


def wait_injecting(core: Any, namespace: str = "default", timeout_s: float = 90.0) -> bool:
    """Wait until the webhook injects: `helm install --wait` returns once the operator pod
    is Ready, but kopf fills in the MutatingWebhookConfiguration (its CA bundle) a moment
    later, and a pod created in between gets no sidecar (found by `ferry dev up --ferry`:
    both engines crashed with no FERRY_AGENT_SOCKET). A dry-run pod shows when it works."""
    import time

    pod = {
        "metadata": {"generateName": "ferry-probe-", "labels": {"ferry.dev/inject": "true"}},
        "spec": {"containers": [{"name": "engine", "image": "ferry.dev/none:0"}]},
    }
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        stored = core.create_namespaced_pod(namespace, pod, dry_run="All")
        if any(c.name == "ferry-agent" for c in stored.spec.init_containers or []):
            return True
        time.sleep(1)
    return False


def agent_token_secret(
    core: Any, namespace: str = "default", name: str = "ferry-agent-token"
) -> bool:
    """The Secret docs/install.md has users create in each workload namespace (key `token`,
    the agents' bearer token); True when it was made here, False when it existed."""
    import base64
    import secrets

    if any(s.metadata.name == name for s in core.list_namespaced_secret(namespace).items):
        return False
    token = base64.b64encode(secrets.token_hex(32).encode()).decode()
    core.create_namespaced_secret(namespace, {"metadata": {"name": name}, "data": {"token": token}})
    return True


def engine_pod(
    name: str, app: str, image: str, script: str, env: dict[str, str] | None = None
) -> dict[str, Any]:
    """A pod as a user writes it: one engine container, labelled for injection and with
    the label its WeightSource or RefitJob selects (`app`). No securityContext, no volumes:
    the webhook adds the agent sidecar, /dev/shm and the socket."""
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "labels": {"ferry.dev/inject": "true", "app": app}},
        "spec": {
            "terminationGracePeriodSeconds": 5,
            "containers": [
                {
                    "name": "engine",
                    "image": image,
                    "imagePullPolicy": "Never",
                    "command": [PY, "-c", script],
                    "env": [{"name": k, "value": v} for k, v in (env or {}).items()],
                    "resources": {"requests": {"cpu": "50m", "memory": "64Mi"}},
                }
            ],
        },
    }


def weightsource(name: str = "policy", app: str = "trainer", lease_s: int = 6) -> dict[str, Any]:
    return manifests.weightsource(name, {"app": app}, "node-demo", lease_s=lease_s)


def refitjob(
    name: str, source: str = "policy", app: str = "inference", **spec: Any
) -> dict[str, Any]:
    return manifests.refitjob(
        name, source, {"app": app}, **{"verify": "full", "timeoutSeconds": 180, **spec}
    )
