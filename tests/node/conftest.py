"""The real-node tier: a real kubelet, containerd and runc run Ferry's pods as containers.

One node per session (`ferry_dev.node.Node`) beside the session's own control plane
(the apiserver advertising the node's bridge address) and kube-controller-manager +
kube-scheduler. The tier skips, naming what is missing, where this host cannot run
containers (not root, no containerd/runc/CNI packages).

On a failure the test's report gets `kubectl get pods -o wide`, `kubectl describe pod`
and the agent containers' logs (`node_report`): the tests put it in their assertion
messages, and `pytest_runtest_makereport` adds it as a report section for every pod
still there (in `default` and the operator's namespace) when any test of the tier fails.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from kubernetes import client as k8s_client
from kubernetes import config as k8s_config

from ferry_dev import images, node_ferry
from ferry_dev.controlplane import ControlPlane
from ferry_dev.kwok import Kwok
from ferry_dev.node import Node, apiserver_args, host_problems

WALL: dict[str, float] = {}
_SESSION: dict[str, ControlPlane] = {}


@pytest.fixture(scope="session")
def node_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ControlPlane, Node]]:
    problems = host_problems()
    if problems:
        pytest.skip("the real-node tier cannot run on this host: " + "; ".join(problems))
    t0 = time.monotonic()
    cp = ControlPlane(
        workdir=tmp_path_factory.mktemp("node-cp"), extra_apiserver_args=apiserver_args()
    )
    cp.start()
    kwok = node = None
    try:
        cp.install_crds()
        kwok = Kwok(cp).start()
        node = Node(cp).start()
        WALL["node_up_s"] = time.monotonic() - t0
        _SESSION["cp"] = cp
        yield cp, node
    finally:
        if node is not None:
            node.stop()
        if kwok is not None:
            kwok.stop()
        _SESSION.clear()
        cp.stop()


@pytest.fixture(scope="session")
def installed(node_cluster):  # type: ignore[no-untyped-def]
    """`helm install` of charts/ferry with the images built here (node_ferry.helm_install):
    (control plane, a function listing the operator's pods)."""
    cp, node = node_cluster
    t0 = time.monotonic()
    op_ref = node.import_image(images.build("operator"))
    ag_ref = node.import_image(images.build("agent"))
    WALL["images_s"] = time.monotonic() - t0
    # The session's control plane has the CRDs (installed by the fixture): the chart installs
    # its own copy, as on a fresh cluster.
    subprocess.run(
        ["kubectl", "--kubeconfig", str(cp.kubeconfig), "delete", "crd", "--all"],
        check=True,
        capture_output=True,
    )
    t0 = time.monotonic()
    done = node_ferry.helm_install(cp.kubeconfig, op_ref, ag_ref)
    WALL["helm_install_s"] = time.monotonic() - t0

    def operator_pods() -> list[str]:
        out = kubectl(cp, "-n", node_ferry.NAMESPACE, "get", "pods", "-o", "name")
        return out.replace("pod/", "").split()

    assert done.returncode == 0, (
        f"helm install: {done.stderr}\n{node_report(cp, node_ferry.NAMESPACE, operator_pods())}"
    )
    return cp, operator_pods


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Iterator[None]:
    """On a failure anywhere in the tier: the node report of every pod left, as a section."""
    outcome = yield
    report = outcome.get_result()
    cp = _SESSION.get("cp")
    if cp is None or not report.failed or call.when == "teardown":
        return
    for ns in ("default", node_ferry.NAMESPACE):
        pods = kubectl(cp, "-n", ns, "get", "pods", "-o", "name").replace("pod/", "").split()
        if pods:
            report.sections.append((f"node report: namespace {ns}", node_report(cp, ns, pods)))


@pytest.fixture
def core(node_cluster: tuple[ControlPlane, Node]) -> k8s_client.CoreV1Api:
    cp, _ = node_cluster
    return k8s_client.CoreV1Api(k8s_config.new_client_from_config(config_file=str(cp.kubeconfig)))


def kubectl(cp: ControlPlane, *args: str) -> str:
    done = subprocess.run(
        ["kubectl", "--kubeconfig", str(cp.kubeconfig), *args],
        capture_output=True,
        text=True,
        timeout=60,
    )
    return done.stdout + done.stderr


def node_report(cp: ControlPlane, namespace: str, pods: list[str]) -> str:
    """What a person debugging the node would look at first."""
    out = ["$ kubectl get pods -o wide", kubectl(cp, "-n", namespace, "get", "pods", "-o", "wide")]
    for pod in pods:
        out += [
            f"$ kubectl describe pod {pod}",
            kubectl(cp, "-n", namespace, "describe", "pod", pod),
        ]
        out += [
            f"$ kubectl logs {pod} -c ferry-agent",
            kubectl(cp, "-n", namespace, "logs", pod, "-c", "ferry-agent", "--tail=60"),
        ]
        prev = kubectl(
            cp, "-n", namespace, "logs", pod, "-c", "ferry-agent", "--previous", "--tail=60"
        )
        out += [f"$ kubectl logs {pod} -c ferry-agent --previous", prev]
    logs = Path(cp.workdir) / "logs" / "kubelet.log"
    if logs.exists():
        out += ["kubelet.log (last 40 lines):", "\n".join(logs.read_text().splitlines()[-40:])]
    return "\n".join(out)


def pytest_terminal_summary(terminalreporter) -> None:  # type: ignore[no-untyped-def]
    """The tier's own phases (seconds): node up, images built and imported, helm install,
    the refit pods Ready, the RefitJob; what docs/operations.md quotes cold and warm."""
    if WALL:
        terminalreporter.write_line(
            "node tier phases: " + ", ".join(f"{k}={v:.1f}" for k, v in WALL.items())
        )
