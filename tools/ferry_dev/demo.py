"""`make demo`: a real refit on a local cluster.

One source and three targets (host memory), each pod's agent a real process.
A WeightSource and a RefitJob are applied with kubectl; the demo waits for the
job to be Complete, checks every target's bytes against the source, prints
what kubectl shows and each target's throughput, and stops everything.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .cluster import DevCluster, demo_layout
from .controlplane import REPO_ROOT

SAMPLES = REPO_ROOT / "examples"
TENSORS, BYTES = 300, 256 << 20


def kubectl(kubeconfig: Path, *args: str) -> str:
    env = {**os.environ, "KUBECONFIG": str(kubeconfig)}
    done = subprocess.run(["kubectl", *args], env=env, capture_output=True, text=True, timeout=180)
    if done.returncode != 0:
        raise SystemExit(f"kubectl {' '.join(args)} failed: {done.stderr.strip()}")
    return done.stdout


def step(msg: str) -> None:
    print(f"==> {msg}", flush=True)


def main() -> int:
    workdir = Path(tempfile.mkdtemp(prefix="ferry-demo-"))
    t0 = time.monotonic()
    step(f"starting etcd, kube-apiserver, the operator and 4 pods with their agents ({workdir})")
    cluster = DevCluster(workdir, sources=1, targets=3, memory="host")
    try:
        cluster.up()
        assert cluster.cp is not None
        kc = cluster.cp.kubeconfig
        print(f"    kubeconfig: {kc}")
        step(
            f"trainer-0 loads {TENSORS} tensors ({BYTES >> 20} MiB) through the engine client, publishes version 1"
        )
        want = cluster.load_weights("trainer-0", "1", demo_layout(TENSORS, BYTES), seed=1)

        step("kubectl apply -f examples/weightsource.yaml")
        print(kubectl(kc, "apply", "-f", str(SAMPLES / "weightsource.yaml")), end="")
        print(
            kubectl(kc, "wait", "--for=condition=Ready", "weightsource/llama-8b", "--timeout=60s"),
            end="",
        )

        step("kubectl apply -f examples/refitjob.yaml")
        print(kubectl(kc, "apply", "-f", str(SAMPLES / "refitjob.yaml")), end="")
        print(
            kubectl(
                kc, "wait", "--for=condition=Complete", "refitjob/refit-step-1", "--timeout=120s"
            ),
            end="",
        )

        step("verifying every target's bytes against the source")
        bad = []
        for pod in sorted(p for p, a in cluster.agents.items() if a.role == "target"):
            got = cluster.weights_digest(pod)
            print(f"    {pod}: sha256 {got[:16]}… {'equal' if got == want else 'DIFFERENT'}")
            if got != want:
                bad.append(pod)

        print("\n$ kubectl get ws,rj")
        print(kubectl(kc, "get", "ws,rj"))
        job = json.loads(kubectl(kc, "get", "refitjob/refit-step-1", "-o", "json"))
        print("per target:")
        for e in job["status"]["targets"]:
            secs = e.get("seconds") or 0
            rate = f"{e['bytes'] / secs / 1e9:.2f} GB/s" if secs else "-"
            print(
                f"    {e['pod']:<12} from {e['source']:<12} {e['bytes'] / 2**20:8.1f} MiB "
                f"in {secs:6.3f} s  {rate}  ({e['phase']})"
            )
        print(
            f"\ncondition Complete: {next(c for c in job['status']['conditions'] if c['type'] == 'Complete')}"
        )
        if bad:
            print(f"FAILED: {', '.join(bad)} hold different bytes")
            return 1
        step(f"done in {time.monotonic() - t0:.0f} s")
        return 0
    finally:
        cluster.down()
        step("stopped everything the demo started")


if __name__ == "__main__":
    sys.exit(main())
