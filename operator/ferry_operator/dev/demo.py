"""`make demo`: a local control plane, the operator, sample resources, and what kubectl shows.

Everything runs as local processes on loopback and is stopped on exit.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .controlplane import REPO_ROOT, ControlPlane, free_port

SAMPLES = REPO_ROOT / "examples"


def kubectl(kubeconfig: Path, *args: str) -> str:
    env = {**os.environ, "KUBECONFIG": str(kubeconfig)}
    done = subprocess.run(["kubectl", *args], env=env, capture_output=True, text=True, timeout=60)
    if done.returncode != 0:
        raise SystemExit(f"kubectl {' '.join(args)} failed: {done.stderr.strip()}")
    return done.stdout


def conditions_table(kubeconfig: Path) -> str:
    items = json.loads(kubectl(kubeconfig, "get", "ws,rj,ac", "-o", "json"))["items"]
    rows = []
    for item in items:
        for c in (item.get("status") or {}).get("conditions", []):
            rows.append((f"{item['kind']}/{item['metadata']['name']}", c["type"], c["status"],
                         c["reason"], c.get("message", "")))
    width = [max(len(r[i]) for r in rows) for i in range(4)] if rows else [0] * 4
    return "\n".join(
        "  ".join(col.ljust(width[i]) for i, col in enumerate(r[:4])) + "  " + r[4] for r in rows
    )


def wait_observed(kubeconfig: Path, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        items = json.loads(kubectl(kubeconfig, "get", "ws,rj,ac", "-o", "json"))["items"]
        if items and all((i.get("status") or {}).get("observedGeneration") == i["metadata"]["generation"]
                         for i in items):
            return
        time.sleep(0.5)
    raise SystemExit("the operator did not observe the samples in time")


def main() -> int:
    workdir = Path(tempfile.mkdtemp(prefix="ferry-demo-"))
    print(f"==> starting etcd and kube-apiserver (work dir {workdir})", flush=True)
    with ControlPlane(workdir=workdir) as cp:
        cp.install_crds()
        print(f"==> CRDs installed; kubeconfig: {cp.kubeconfig}", flush=True)
        env = {**os.environ, "KUBECONFIG": str(cp.kubeconfig)}
        log = open(workdir / "operator.log", "wb")  # noqa: SIM115
        op = subprocess.Popen([sys.executable, "-m", "ferry_operator", "run", "--all-namespaces",
                               "--health-port", str(free_port())],
                              env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            print("==> operator running; applying examples/", flush=True)
            print(kubectl(cp.kubeconfig, "apply", "-f", str(SAMPLES)), end="")
            wait_observed(cp.kubeconfig)
            print("\n$ kubectl get ws,rj,ac")
            print(kubectl(cp.kubeconfig, "get", "ws,rj,ac"))
            print("conditions:")
            print(conditions_table(cp.kubeconfig))
            print("\n$ kubectl get events")
            print(kubectl(cp.kubeconfig, "get", "events", "--sort-by=.lastTimestamp"))
        finally:
            op.terminate()
            op.wait(timeout=30)
    print("==> stopped everything the demo started")
    return 0


if __name__ == "__main__":
    sys.exit(main())
