"""`helm install` of charts/ferry on the real node: CRDs installed, the operator pod
Ready as the chart runs it (non-root, read-only root), its webhook serving from the pod
(the apiserver dials the pod's IP) and injecting the sidecar into a user's pod.

The install is the session fixture `installed` (conftest.py), which test_refit.py uses
too. Runs before test_injected_pod.py (file order): helm owns the agent ClusterRole it
renders; that module's kubectl apply of the same object then changes nothing."""

from __future__ import annotations

import subprocess
import time
import uuid

from ferry_dev import node_ferry
from ferry_operator.injection import AGENT_NAME

from .conftest import node_report

NS = node_ferry.NAMESPACE


def test_helm_install_operator_ready_and_stays_up(installed, core) -> None:  # type: ignore[no-untyped-def]
    """The operator pod is Ready, never restarted, and wrote its CA into the caBundle of
    the MutatingWebhookConfiguration the chart rendered (ca-bundle mode: it creates no
    webhook configuration of its own, so no validating one exists)."""
    cp, pods = installed
    names = pods()
    assert names, "no operator pod"

    def kubectl(*args: str) -> str:
        return subprocess.run(
            ["kubectl", "--kubeconfig", str(cp.kubeconfig), *args], capture_output=True, text=True
        ).stdout

    bundle = ""
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        bundle = kubectl(
            "get", "mutatingwebhookconfiguration", "ferry.dev",
            "-o", "jsonpath={.webhooks[0].clientConfig.caBundle}",
        )  # fmt: skip
        if bundle:
            break
        time.sleep(2)
    for name in names:
        pod = core.read_namespaced_pod(name, NS)
        assert all(s.restart_count == 0 and s.ready for s in pod.status.container_statuses), (
            node_report(cp, NS, names)
        )
    assert bundle, f"no caBundle written\n{node_report(cp, NS, names)}"
    assert "ferry.dev" not in kubectl("get", "validatingwebhookconfigurations", "-o", "name")


def test_webhook_served_from_the_pod_injects_the_sidecar(installed, core) -> None:  # type: ignore[no-untyped-def]
    """A pod as a user writes it, labelled for injection: the apiserver calls the operator
    pod's webhook (through the Service's endpoint on the pod network) and the stored pod
    has the agent sidecar with the chart's agent image."""
    cp, pods = installed
    name = f"user-{uuid.uuid4().hex[:6]}"
    pod = {
        "metadata": {"name": name, "labels": {"ferry.dev/inject": "true"}},
        "spec": {
            "containers": [
                {"name": "engine", "image": "ferry.dev/none:0", "imagePullPolicy": "Never"}
            ]
        },
    }
    deadline = time.monotonic() + 60
    while True:  # the apiserver picks the written caBundle up a moment later
        stored = core.create_namespaced_pod("default", pod, dry_run="All")
        inits = [c.name for c in stored.spec.init_containers or []]
        if AGENT_NAME in inits or time.monotonic() > deadline:
            break
        time.sleep(2)
    assert inits[:1] == [AGENT_NAME], f"not injected: {inits}\n{node_report(cp, NS, pods())}"
    agent = stored.spec.init_containers[0]
    assert agent.image.startswith("ferry.dev/agent:") and agent.restart_policy == "Always"
