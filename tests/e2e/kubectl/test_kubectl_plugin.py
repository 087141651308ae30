"""End to end: `kubectl ferry` (as a subprocess, like kubectl runs it) against a
local cluster whose agents do real, deliberately slowed, NIXL pulls."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time

import pytest

from ferry_dev.cluster import DevCluster, demo_layout
from tests.kube_helpers import GROUP, VERSION, create, get, wait_for

pytestmark = pytest.mark.e2e


def plugin(c: DevCluster, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    assert c.cp is not None
    env = {**os.environ, "KUBECONFIG": str(c.cp.kubeconfig), "PYTHONUNBUFFERED": "1"}
    return subprocess.run(
        [sys.executable, "-m", "ferry_kubectl", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def ready_source(c: DevCluster) -> None:
    api = c.api()
    create(
        api,
        c.namespace,
        "weightsources",
        {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": "WeightSource",
            "metadata": {"name": "policy"},
            "spec": {
                "model": {"name": "tiny-llama"},
                "selector": {"matchLabels": {"app": "trainer"}},
                "memory": "host",
                "heartbeat": {"leaseDurationSeconds": 6, "renewIntervalSeconds": 1},
            },
        },
    )
    c.load_weights("trainer-0", "1", demo_layout(60, 24 << 20), seed=1)
    wait_for(
        lambda: (
            get(api, "weightsources", c.namespace, "policy").get("status", {}).get("version") == "1"
        ),
        timeout=30,
        what="source serving version 1",
    )


# 24 MiB per target at 5 MB/s: about five seconds per pull. One pull at a time
# (maxFanOut 1) so the job moves through distinct steps. Agents today report a
# target's bytes when its pull starts and when it ends, so job-level percentages
# are what move; per-target bars fill in as soon as agents report mid-pull.
@pytest.mark.cluster(sources=1, targets=2, env={"FERRY_PULL_MAX_GBPS": "0.005"})
def test_refit_watch_and_status(cluster: DevCluster) -> None:
    ready_source(cluster)
    started = time.monotonic()
    done = plugin(
        cluster,
        "refit",
        "policy",
        "--targets",
        "app=inference",
        "--max-fan-out",
        "1",
        "--chunk-bytes",
        "1Mi",
        "--interval",
        "0.5",
    )
    took = time.monotonic() - started
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    name = re.fullmatch(r"refitjob\.ferry\.dev/(policy-refit-\w+) created", lines[0]).group(1)  # type: ignore[union-attr]
    job = get(cluster.api(), "refitjobs", cluster.namespace, name)
    assert job["status"]["phase"] == "Succeeded" and job["spec"]["strategy"]["maxFanOut"] == 1
    assert job["spec"]["strategy"]["chunkBytes"] == 1 << 20
    # Progress shown while it ran: the job's percentage in several distinct steps,
    # each target seen pulling, then done with its throughput.
    shown = [int(p) for p in re.findall(rf"refitjob/{name} .* (\d+)%  ", done.stdout)]
    assert {0, 50, 100} <= set(shown), done.stdout
    assert shown == sorted(shown), "progress never goes backwards"
    for pod in ("inference-0", "inference-1"):
        assert re.search(rf"^{pod} +0% .*Pulling <- trainer-0$", done.stdout, re.M), done.stdout
        assert re.search(rf"^{pod} +100% +24\.2 MB/24\.2 MB +[\d.]+ MB/s +Done$", done.stdout, re.M)
    assert lines[-1].startswith(f"refitjob/{name} Complete: 2/2 targets hold 1, 48.3 MB in ")
    assert took > 8, f"two slowed pulls in sequence cannot finish in {took:.1f}s"

    again = plugin(cluster, "watch", f"refitjob/{name}")
    assert again.returncode == 0 and "Complete: 2/2 targets" in again.stdout

    status = plugin(cluster, "status")
    assert status.returncode == 0, status.stderr
    rows = [line.split() for line in status.stdout.splitlines() if line.strip()]
    assert ["policy", "tiny-llama", "1", "1/1"] == next(r for r in rows if r[0] == "policy")[:4]
    assert [name, "policy", "1", "Succeeded", "2/2", "100%"] == next(
        r for r in rows if r[0] == name
    )[:6]
    assert "No ArtifactCaches in namespace default." in status.stdout

    print(done.stdout, status.stdout, sep="\n")
    missing = plugin(cluster, "watch", "rj", "nope")
    assert missing.returncode == 2 and missing.stdout == ""
    assert missing.stderr == 'error: refitjob "nope" in namespace "default" not found\n'
    no_source = plugin(cluster, "refit", "nope", "--targets", "app=inference")
    assert no_source.returncode == 2 and 'weightsource "nope"' in no_source.stderr
