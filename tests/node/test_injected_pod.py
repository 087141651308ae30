"""An engine pod with the agent sidecar exactly as the webhook injects it, run by a real
kubelet: the sidecar's real security context (read-only root filesystem, non-root,
no capabilities), its Secret and emptyDir mounts, its startup probe gating the engine."""

from __future__ import annotations

import base64
import subprocess
import time
import uuid

import pytest
from kubernetes import client as k8s_client

from ferry_dev import images
from ferry_dev.paths import REPO_ROOT as REPO
from ferry_operator.injection import AGENT_NAME, InjectSettings, inject

from .conftest import WALL, node_report

ENGINE = "engine"


def engine_pod(name: str, image: str, command: str, pod_security: dict | None = None) -> dict:
    """What a user writes: one engine container, labelled for injection (by default no
    pod securityContext at all: no fsGroup, the images' own users)."""
    return {
        "metadata": {"name": name, "labels": {"ferry.dev/inject": "true", "app": "node-test"}},
        "spec": {
            "restartPolicy": "Never",
            "terminationGracePeriodSeconds": 2,
            **({"securityContext": pod_security} if pod_security else {}),
            "containers": [
                {
                    "name": ENGINE,
                    "image": image,
                    "imagePullPolicy": "Never",
                    "command": ["/usr/local/bin/python3.11", "-c", command],
                }
            ],
        },
    }


def injected(pod: dict, agent_image: str) -> dict:
    s = InjectSettings(
        image=agent_image,
        memory_mode="host",
        rails="off",
        requests={"cpu": "50m", "memory": "64Mi"},
        limits={"memory": "2Gi"},
    )
    spec = inject(pod["spec"], s)
    assert spec is not None
    for c in spec["initContainers"]:
        c["imagePullPolicy"] = "Never"
    return {**pod, "spec": spec}


def wait_for(predicate, timeout: float, what: str, report) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(1)
    pytest.fail(f"{what} within {timeout:.0f}s\n{report()}")


@pytest.fixture(scope="module")
def agent_image(node_cluster) -> str:  # type: ignore[no-untyped-def]
    _, node = node_cluster
    t0 = time.monotonic()
    ref = node.import_image(images.build("agent"))
    WALL["agent_image_s"] = time.monotonic() - t0
    return ref


@pytest.fixture(scope="module")
def agent_rbac(node_cluster) -> None:  # type: ignore[no-untyped-def]
    """The agent's ClusterRole and its binding to `default`, exactly as the chart renders them."""
    cp, _ = node_cluster
    helm = (
        subprocess.run([str(REPO / "hack" / "helm.sh")], check=True, capture_output=True, text=True)
        .stdout.strip()
        .splitlines()[-1]
    )
    rendered = subprocess.run(
        [
            helm,
            "template",
            "ferry",
            str(REPO / "charts" / "ferry"),
            "--show-only",
            "templates/rbac-agent.yaml",
            "--set",
            "agent.rbac.bindings[0].namespace=default,agent.rbac.bindings[0].serviceAccount=default",
        ],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    subprocess.run(
        ["kubectl", "--kubeconfig", str(cp.kubeconfig), "apply", "-f", "-"],
        input=rendered,
        check=True,
        capture_output=True,
        text=True,
    )


def _agent_status(pod: k8s_client.V1Pod) -> k8s_client.V1ContainerStatus | None:
    return next((s for s in pod.status.init_container_statuses or [] if s.name == AGENT_NAME), None)


@pytest.mark.parametrize(
    "pod_security",
    [None, {"runAsUser": 1000, "runAsGroup": 1000, "fsGroup": 2000}],
    ids=["no-pod-security-context", "engine-uid-1000-fsgroup"],
)
def test_injected_sidecar_starts_and_gates_the_engine(
    node_cluster,
    core,
    agent_image,
    agent_rbac,  # type: ignore[no-untyped-def]
    pod_security,
) -> None:
    """The sidecar as injected (read-only root, uid 65532, no /tmp volume) passes its
    startup probe on a real kubelet, and only then does the engine container start: the
    engine sees the agent's socket and the shared /dev/shm; the token Secret is
    readable by the agent's non-root user and by nobody else."""
    cp, _ = node_cluster
    ns = "default"
    name = f"engine-{uuid.uuid4().hex[:6]}"
    made_secret = not any(
        s.metadata.name == "ferry-agent-token"  # the chart makes it per binding
        for s in core.list_namespaced_secret(ns).items
    )
    if made_secret:
        core.create_namespaced_secret(
            ns,
            {
                "metadata": {"name": "ferry-agent-token"},
                "data": {"token": base64.b64encode(b"node-test-token").decode()},
            },
        )
    check = (
        "import os, stat, sys, time\n"
        "sock = os.environ['FERRY_AGENT_SOCKET']\n"
        "assert stat.S_ISSOCK(os.stat(sock).st_mode), sock\n"
        "open('/dev/shm/engine-probe', 'w').write('x')\n"
        "print('engine saw', sock, flush=True)\n"
        "time.sleep(3600)\n"
    )
    core.create_namespaced_pod(
        ns, injected(engine_pod(name, agent_image, check, pod_security), agent_image)
    )
    report = lambda: node_report(cp, ns, [name])  # noqa: E731
    try:

        def engine_running() -> bool:
            pod = core.read_namespaced_pod(name, ns)
            agent = _agent_status(pod)
            assert agent is None or agent.restart_count == 0, (
                f"the agent sidecar restarted\n{report()}"
            )
            return any(
                s.name == ENGINE and s.state.running for s in pod.status.container_statuses or []
            )

        wait_for(engine_running, 240, "the engine container did not start", report)
        pod = core.read_namespaced_pod(name, ns)
        agent = _agent_status(pod)
        assert agent is not None and agent.started and agent.state.running, report()
        # Native-sidecar order: the engine started after the agent passed its startup probe.
        engine = next(s for s in pod.status.container_statuses if s.name == ENGINE)
        assert engine.state.running.started_at >= agent.state.running.started_at
        wait_for(
            lambda: (
                "engine saw" in (core.read_namespaced_pod_log(name, ns, container=ENGINE) or "")
            ),
            60,
            "the engine did not find the agent's socket",
            report,
        )
    finally:
        core.delete_namespaced_pod(name, ns, grace_period_seconds=0)
        if made_secret:
            core.delete_namespaced_secret("ferry-agent-token", ns)
