"""Agent liveness through Leases, against the real apiserver and the real operator.

The reporter here is the agent's real reporter module; its `info` callback
stands in for the slab state of an agent holding weights (the data plane has
its own process tests in tests/e2e/agent).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from kubernetes import client as k8s_client

from ferry_agent.k8s.reporter import Identity, Reporter
from tests.kube_helpers import GROUP, VERSION, cond, create, get, make_pod, wait_for

WS = {
    "apiVersion": f"{GROUP}/{VERSION}",
    "kind": "WeightSource",
    "metadata": {"name": "src"},
    "spec": {
        "model": {"name": "llama"},
        "selector": {"matchLabels": {"app": "trainer"}},
        "heartbeat": {"leaseDurationSeconds": 3, "renewIntervalSeconds": 1},
    },
}
READY = {"state": "Ready", "version": "9", "fingerprint": "fp", "tensors": 2, "bytes": 4096}


def member(api: k8s_client.ApiClient, ns: str, pod: str) -> dict:
    members = get(api, "weightsources", ns, "src").get("status", {}).get("members", [])
    return next((m for m in members if m["pod"] == pod), {})


def test_sigterm_marks_stale_and_nothing_marks_ready_after(
    api_client: k8s_client.ApiClient, namespace: str, operator
) -> None:
    create(api_client, namespace, "weightsources", WS)
    make_pod(api_client, namespace, "trainer-0", {"app": "trainer"})
    rep = Reporter(
        Identity("trainer-0", namespace, "node-a", "10.0.0.1:7470"),
        lambda: READY,
        api_client,
        lease_seconds=3,
        renew_seconds=0.5,
    ).start()
    wait_for(
        lambda: member(api_client, namespace, "trainer-0").get("state") == "Ready", what="Ready"
    )
    ws = wait_for(
        lambda: (
            (o := get(api_client, "weightsources", namespace, "src"))["status"].get("readyReplicas")
            == 1
            and o
        ),
        what="readyReplicas=1",
    )
    assert ws["status"]["members"][0]["endpoint"] == "10.0.0.1:7470"
    assert ws["status"]["version"] == "9"

    rep.stop()
    assert member(api_client, namespace, "trainer-0")["state"] == "Stale"
    coord = k8s_client.CoordinationV1Api(api_client)
    assert not [
        le
        for le in coord.list_namespaced_lease(namespace).items
        if le.metadata.name == "ferry-agent-trainer-0"
    ], "lease must be released"
    rep._beat()  # a heartbeat arriving after shutdown began must write nothing
    rep.poke()
    time.sleep(2)
    assert member(api_client, namespace, "trainer-0")["state"] == "Stale"
    ws = wait_for(
        lambda: (
            (o := get(api_client, "weightsources", namespace, "src"))["status"].get("readyReplicas")
            == 0
            and o
        ),
        what="readyReplicas=0",
    )
    assert cond(ws, "Ready")["status"] == "False"


REPORTER = textwrap.dedent("""
    import sys, time
    from kubernetes import config
    from ferry_agent.k8s.reporter import Identity, Reporter
    api = config.new_client_from_config(config_file=sys.argv[1])
    info = {"state": "Ready", "version": "1", "fingerprint": "fp"}
    Reporter(Identity(sys.argv[3], sys.argv[2], None, "127.0.0.1:1"), lambda: info, api,
             lease_seconds=3, renew_seconds=0.5).start()
    print("up", flush=True)
    time.sleep(600)
""")


def test_expired_lease_is_marked_stale_within_one_lease_duration(
    api_client: k8s_client.ApiClient, namespace: str, kubeconfig: Path, tmp_path: Path, operator
) -> None:
    create(api_client, namespace, "weightsources", WS)
    make_pod(api_client, namespace, "trainer-1", {"app": "trainer"})
    script = tmp_path / "reporter.py"
    script.write_text(REPORTER)
    proc = subprocess.Popen(
        [sys.executable, str(script), str(kubeconfig), namespace, "trainer-1"],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ},
    )
    try:
        assert proc.stdout.readline().strip() == "up"
        wait_for(
            lambda: (
                get(api_client, "weightsources", namespace, "src")["status"].get("readyReplicas")
                == 1
            ),
            what="Ready via the agent process",
        )
        proc.send_signal(signal.SIGKILL)  # no goodbye: only the Lease can tell
        killed = time.monotonic()
        lease = k8s_client.CoordinationV1Api(api_client).read_namespaced_lease(
            "ferry-agent-trainer-1", namespace
        )
        expires = lease.spec.lease_duration_seconds
        wait_for(
            lambda: member(api_client, namespace, "trainer-1").get("state") == "Stale",
            timeout=20,
            what="Stale",
        )
        elapsed = time.monotonic() - killed
        # expiry (<= 3 s after the last renewal) plus at most one lease duration to notice
        assert elapsed <= 2 * expires + 1, f"Stale after {elapsed:.1f}s"
        ws = get(api_client, "weightsources", namespace, "src")
        assert cond(ws, "Degraded")["reason"] == "ReplicasStale"
        assert ws["status"]["readyReplicas"] == 0
        gauge = f'ferry_operator_stale_replicas{{namespace="{namespace}",weightsource="src"}} 1.0'
        wait_for(lambda: gauge in operator.metrics(), timeout=10, what="stale gauge")
    finally:
        proc.kill()
        proc.wait()
