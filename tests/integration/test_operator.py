"""The operator, as a real process against the real apiserver, reports honest status."""

from __future__ import annotations

import socket
import threading
import time
import urllib.request
from pathlib import Path

import pytest
import yaml
from kubernetes import client as k8s_client

from ferry_agent.k8s.reporter import Identity, Reporter
from ferry_dev.controlplane import ControlPlane
from ferry_dev.operatorproc import OperatorProcess, start_operator
from tests.kube_helpers import GROUP, VERSION, cond, create, get, make_pod, wait_for

WS = {
    "apiVersion": f"{GROUP}/{VERSION}",
    "kind": "WeightSource",
    "metadata": {"name": "src"},
    "spec": {"model": {"name": "llama"}, "selector": {"matchLabels": {"app": "trainer"}}},
}


def test_weightsource_conditions_follow_the_world(
    api_client: k8s_client.ApiClient, namespace: str, operator: OperatorProcess
) -> None:
    create(api_client, namespace, "weightsources", WS)
    obj = wait_for(
        lambda: (
            (o := get(api_client, "weightsources", namespace, "src"))
            .get("status", {})
            .get("observedGeneration")
            == 1
            and o
        ),
        what="first reconcile",
    )
    ready = cond(obj, "Ready")
    assert ready["status"] == "False" and ready["reason"] == "NoReplicas"
    assert ready["observedGeneration"] == 1 and ready["lastTransitionTime"]
    assert "app=trainer" in ready["message"]
    assert cond(obj, "Degraded")["status"] == "False"

    # Pods appear: the level-triggered resync notices without any edge on the CR.
    for i in range(2):
        make_pod(api_client, namespace, f"trainer-{i}", {"app": "trainer"})
    obj = wait_for(
        lambda: (
            (o := get(api_client, "weightsources", namespace, "src"))["status"].get("replicas") == 2
            and o
        ),
        what="replicas=2",
    )
    assert cond(obj, "Ready")["reason"] == "NoReadyReplicas"
    assert obj["status"]["readySummary"] == "0/2"

    # An agent writes only its own entry (its own field manager) and keeps its
    # Lease; the operator aggregates.
    info = {
        "state": "Ready",
        "version": "7",
        "fingerprint": "f" * 16,
        "tensors": 3,
        "bytes": 3 << 30,
    }
    reporter = Reporter(
        Identity("trainer-0", namespace, None, "127.0.0.1:7470"),
        lambda: info,
        api_client,
        renew_seconds=1,
    ).start()
    obj = wait_for(
        lambda: (
            (o := get(api_client, "weightsources", namespace, "src"))["status"].get("readyReplicas")
            == 1
            and o
        ),
        what="readyReplicas=1",
    )
    st = obj["status"]
    assert cond(obj, "Ready")["status"] == "True"
    assert st["version"] == "7" and st["bytes"] == 3 << 30 and st["size"] == "3.0GiB"
    assert st["members"][0]["pod"] == "trainer-0", (
        "the operator's apply must not drop agent entries"
    )
    assert cond(obj, "Degraded")["reason"] == "ReplicasNotReady"

    # A spec change bumps generation; observedGeneration follows.
    k8s_client.CustomObjectsApi(api_client).patch_namespaced_custom_object(
        GROUP,
        VERSION,
        namespace,
        "weightsources",
        "src",
        {"spec": {"model": {"revision": "step-8"}}},
    )
    obj = wait_for(
        lambda: (
            (o := get(api_client, "weightsources", namespace, "src"))["status"].get(
                "observedGeneration"
            )
            == 2
            and o
        ),
        what="observedGeneration=2",
    )
    assert all(c["observedGeneration"] == 2 for c in obj["status"]["conditions"])
    reporter.stop()


def test_refitjob_reports_missing_source_then_resolves_latest(
    api_client: k8s_client.ApiClient, namespace: str, operator: OperatorProcess
) -> None:
    create(
        api_client,
        namespace,
        "refitjobs",
        {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": "RefitJob",
            "metadata": {"name": "job"},
            "spec": {
                "sourceRef": {"name": "src"},
                "targets": {"matchLabels": {"app": "inference"}},
            },
        },
    )
    obj = wait_for(
        lambda: cond(get(api_client, "refitjobs", namespace, "job"), "Progressing"),
        what="Progressing condition",
    )
    assert obj["reason"] == "SourceNotFound" and "spec.sourceRef.name" in obj["message"]
    job = get(api_client, "refitjobs", namespace, "job")
    assert job["status"]["phase"] == "Pending"
    assert cond(job, "Complete")["status"] == "False" and cond(job, "Failed")["status"] == "False"
    assert "version" not in job["status"], "latest must not resolve before the source exists"

    events = k8s_client.CoreV1Api(api_client).list_namespaced_event(namespace).items
    assert any(
        e.reason == "SourceNotFound" and e.involved_object.name == "job" and e.type == "Warning"
        for e in events
    )

    create(api_client, namespace, "weightsources", WS)
    make_pod(api_client, namespace, "trainer-0", {"app": "trainer"})
    wait_for(
        lambda: get(api_client, "weightsources", namespace, "src").get("status"), what="ws status"
    )
    info = {"state": "Ready", "version": "42", "fingerprint": "abc"}
    reporter = Reporter(
        Identity("trainer-0", namespace, None, "127.0.0.1:7470"),
        lambda: info,
        api_client,
        renew_seconds=1,
    ).start()
    job = wait_for(
        lambda: (
            (o := get(api_client, "refitjobs", namespace, "job"))["status"].get("version") and o
        ),
        what="version resolved",
    )
    assert job["status"]["version"] == "42"
    assert cond(job, "Progressing")["reason"] == "NoTargets"
    reporter.stop()


def test_artifactcache_says_unsigned_caches_are_allowed(
    api_client: k8s_client.ApiClient, namespace: str, operator: OperatorProcess
) -> None:
    samples = Path(__file__).resolve().parents[2] / "examples" / "artifactcache.yaml"
    create(api_client, namespace, "artifactcaches", yaml.safe_load(samples.read_text()))
    obj = wait_for(
        lambda: (
            (o := get(api_client, "artifactcaches", namespace, "llama-8b-inductor"))
            .get("status", {})
            .get("trust")
            and o
        ),
        what="trust status",
    )
    assert obj["status"]["trust"] == "Unverified"
    trusted = cond(obj, "Trusted")
    assert trusted["status"] == "False" and trusted["reason"] == "UnsignedAllowed"
    assert "spec.trust.allowUnsigned" in trusted["message"]
    assert cond(obj, "Ready")["reason"] == "NoSource"


def test_metrics_count_reconciles(
    operator: OperatorProcess, api_client: k8s_client.ApiClient, namespace: str
) -> None:
    create(api_client, namespace, "weightsources", WS)
    wait_for(
        lambda: get(api_client, "weightsources", namespace, "src").get("status"), what="status"
    )
    text = operator.metrics()
    ok = [
        line
        for line in text.splitlines()
        if line.startswith('ferry_operator_reconciles_total{kind="WeightSource",result="ok"}')
    ]
    assert ok and float(ok[0].split()[-1]) >= 1
    assert 'ferry_operator_reconcile_duration_seconds_count{kind="WeightSource"}' in text
    assert operator.healthz() == 200


class BlackholeProxy:
    """A loopback TCP forwarder that can stop passing bytes, to kill watches without killing the apiserver."""

    def __init__(self, target_port: int) -> None:
        self.target = target_port
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.blocked = threading.Event()
        self.conns: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            if self.blocked.is_set():
                conn.close()
                continue
            upstream = socket.create_connection(("127.0.0.1", self.target))
            self.conns += [conn, upstream]
            for a, b in ((conn, upstream), (upstream, conn)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    def _pipe(self, a: socket.socket, b: socket.socket) -> None:
        try:
            while data := a.recv(65536):
                while self.blocked.is_set():  # hold bytes: a half-dead connection
                    time.sleep(0.1)
                b.sendall(data)
        except OSError:
            pass

    def close(self) -> None:
        self.sock.close()
        for c in self.conns:
            c.close()


def test_liveness_fails_when_watches_die(control_plane: ControlPlane, tmp_path: Path) -> None:
    proxy = BlackholeProxy(control_plane.port)
    config = yaml.safe_load(control_plane.kubeconfig.read_text())
    config["clusters"][0]["cluster"]["server"] = f"https://127.0.0.1:{proxy.port}"
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(yaml.safe_dump(config))
    op = start_operator(
        kubeconfig, tmp_path / "operator.log", "--canary-seconds", "1", "--watch-timeout", "5"
    )
    try:
        wait_for(lambda: op.healthz() == 200, what="healthy")
        time.sleep(4)
        assert op.healthz() == 200, "a live operator must stay healthy"
        proxy.blocked.set()
        wait_for(lambda: op.healthz() == 503, timeout=30, what="healthz 503")
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(f"{op.health_url}/healthz", timeout=3)
        assert refused.value.code == 503
        assert "canary lease not seen" in refused.value.read().decode()
        proxy.blocked.clear()
        wait_for(lambda: op.healthz() == 200, timeout=60, what="healthy again after reconnect")
    finally:
        op.stop()
        proxy.close()
