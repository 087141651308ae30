"""A RefitJob between two pods on the real node, with Ferry installed by helm: a trainer
and an inference pod as users write them (labelled for injection; the operator pod's
webhook adds the agent), each with an engine container running the project's engine
client in host memory (ferry_dev.node_ferry). The WeightSource goes Ready, the job
completes with every byte verified (spec.verify: full, and the target engine's sha256
equals the trainer's), and deleting the trainer pod makes its replica Stale."""

from __future__ import annotations

import re
import time
from typing import Any

import pytest
from kubernetes import client as k8s_client
from kubernetes import config as k8s_config

from ferry_dev import images, node_ferry
from ferry_operator.injection import AGENT_NAME

from .conftest import WALL, node_report

NS = "default"
GROUP, VERSION = node_ferry.GROUP, node_ferry.VERSION


def wait_for(fn, timeout: float, what: str, report) -> Any:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if out := fn():
            return out
        time.sleep(1)
    pytest.fail(f"{what} within {timeout:.0f}s\n{report()}")


def log(core: k8s_client.CoreV1Api, pod: str) -> str:
    try:
        return core.read_namespaced_pod_log(pod, NS, container="engine") or ""
    except k8s_client.ApiException:
        return ""


def test_refit_between_two_pods_bytes_verified_then_delete_goes_stale(installed, core) -> None:  # type: ignore[no-untyped-def]
    cp, _ = installed
    custom = k8s_client.CustomObjectsApi(
        k8s_config.new_client_from_config(config_file=str(cp.kubeconfig))
    )
    image = images.build("agent").ref  # imported by `installed`; the engine runs from it
    trainer, server = "trainer-0", "inference-0"
    report = lambda: node_report(cp, NS, [trainer, server])  # noqa: E731
    get = lambda plural, name: custom.get_namespaced_custom_object(GROUP, VERSION, NS, plural, name)  # noqa: E731
    t0 = time.monotonic()
    # Pods made right after the install get no sidecar until the webhook is configured.
    assert node_ferry.wait_injecting(core, NS), f"the webhook never injected\n{report()}"
    made_secret = node_ferry.agent_token_secret(core, NS)  # a user's step in docs/install.md
    custom.create_namespaced_custom_object(
        GROUP, VERSION, NS, "weightsources", node_ferry.weightsource()
    )
    try:
        for name, app, script in (
            (trainer, "trainer", node_ferry.SOURCE_ENGINE),
            (server, "inference", node_ferry.TARGET_ENGINE),
        ):
            stored = core.create_namespaced_pod(NS, node_ferry.engine_pod(name, app, image, script))
            assert [c.name for c in stored.spec.init_containers or []] == [AGENT_NAME], (
                f"the webhook did not inject {name}\n{report()}"
            )

        published = wait_for(
            lambda: re.search(r"published 1 (sha256:\w+)", log(core, trainer)),
            240,
            "the trainer did not publish",
            report,
        ).group(1)
        wait_for(
            lambda: "waiting for a refit" in log(core, server),
            240,
            "the inference engine did not start",
            report,
        )

        def ready() -> bool:
            st = get("weightsources", "policy").get("status") or {}
            return st.get("version") == "1" and any(
                c["type"] == "Ready" and c["status"] == "True" for c in st.get("conditions") or []
            )

        wait_for(
            ready,
            60,
            "the WeightSource was not Ready on version 1",
            lambda: f"{get('weightsources', 'policy').get('status')}\n{report()}",
        )
        WALL["refit_pods_ready_s"] = time.monotonic() - t0

        t1 = time.monotonic()
        custom.create_namespaced_custom_object(
            GROUP, VERSION, NS, "refitjobs", node_ferry.refitjob("refit")
        )
        job = wait_for(
            lambda: (
                (j := get("refitjobs", "refit")).get("status", {}).get("phase")
                in ("Succeeded", "Failed")
                and j
            ),
            180,
            "the RefitJob did not finish",
            report,
        )
        WALL["refit_job_s"] = time.monotonic() - t1
        assert job["status"]["phase"] == "Succeeded", f"{job['status']}\n{report()}"
        assert job["status"]["targetsSummary"] == "1/1" and job["status"]["version"] == "1", job[
            "status"
        ]
        served = wait_for(
            lambda: re.search(r"served 1 ok=True (sha256:\w+)", log(core, server)),
            30,
            "the inference engine was not resumed on version 1",
            report,
        ).group(1)
        assert served == published, f"inference-0 holds other bytes than trainer-0\n{report()}"

        # Deleting the trainer: its agent (SIGTERM after the engine stopped) marks its replica Stale.
        core.delete_namespaced_pod(trainer, NS)

        def stale() -> dict | None:
            st = get("weightsources", "policy").get("status") or {}
            member = next((m for m in st.get("members") or [] if m.get("pod") == trainer), {})
            # The agent writes Stale; the operator then recounts (no Ready replica left).
            return st if member.get("state") == "Stale" and st.get("readyReplicas") == 0 else None

        st = wait_for(
            stale,
            60,
            "trainer-0's replica did not go Stale",
            lambda: f"{get('weightsources', 'policy').get('status')}\n{report()}",
        )
        assert not any(c["type"] == "Ready" and c["status"] == "True" for c in st["conditions"]), st
    finally:
        for pod in (trainer, server):
            try:
                core.delete_namespaced_pod(pod, NS, grace_period_seconds=0)
            except k8s_client.ApiException:
                pass
        if made_secret:
            core.delete_namespaced_secret("ferry-agent-token", NS)
        for plural, name in (("refitjobs", "refit"), ("weightsources", "policy")):
            try:
                custom.delete_namespaced_custom_object(GROUP, VERSION, NS, plural, name)
            except k8s_client.ApiException:
                pass
