"""Faults of agents while real agents move real bytes: a source killed under a chain
relay, a target's agent restarted mid-pull, and agents frozen (SIGSTOP) under load
so that their Leases expire.

Each test ends with every target's bytes checked against the source or with the
failure reason a user would read, and every job deleted (its finalizer released).
"""

from __future__ import annotations

import os
import signal
import threading
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from kubernetes import client as k8s_client

from ferry_dev.cluster import DevCluster, digest
from tests.e2e.faults.faults_helpers import (
    LAYOUT,
    LAYOUT_BYTES,
    assert_bytes,
    delete_jobs_and_check_finalizers,
    entries,
    finished,
    poll,
    ready_source,
    refitjob,
    targets,
)
from tests.kube_helpers import cond, create, get

pytestmark = pytest.mark.e2e


def node_of(c: DevCluster, pod: str) -> str:
    return k8s_client.CoreV1Api(c.api()).read_namespaced_pod(pod, c.namespace).spec.node_name


def label_pods(c: DevCluster, labels: dict[str, dict[str, str]]) -> None:
    core = k8s_client.CoreV1Api(c.api())
    for pod, extra in labels.items():
        core.patch_namespaced_pod(pod, c.namespace, {"metadata": {"labels": extra}})


# -- a source killed under a chain relay ---------------------------------------------------
# 24 MiB at 0.008 GB/s: ~3 s per link, so the kill lands while links are relaying.
# Two sources, three targets: chains trainer-0 -> inference-0 -> inference-2 and
# trainer-1 -> inference-1 (the planner's shortest-chain rule).
@pytest.mark.cluster(sources=2, targets=3, env={"FERRY_PULL_MAX_GBPS": "0.008"})
def test_source_killed_during_chain_relay_relinks_downstream(cluster: DevCluster) -> None:
    want = ready_source(cluster)
    api, ns = cluster.api(), cluster.namespace
    create(
        api, ns, "refitjobs", refitjob("refit", strategy={"type": "chain", "chunkBytes": 1 << 20})
    )

    def relaying() -> dict[str, dict[str, Any]] | None:
        e = entries(get(api, "refitjobs", ns, "refit"))
        head = next((p for p, x in e.items() if x.get("source") == "trainer-0"), None)
        tail = next((p for p, x in e.items() if head and x.get("source") == head), None)
        ok = (
            head
            and tail
            and e[head].get("phase") == "Pulling"
            and (e[head].get("bytes") or 0) > 0
            and e[tail].get("phase") == "Pulling"
        )
        return e if ok else None

    at_kill = poll(relaying, timeout=60, what="trainer-0's chain relaying with bytes landed")
    killed = time.monotonic()
    cluster.stop_agent("trainer-0", kill=True)

    job = finished(cluster, "refit")
    assert job["status"]["phase"] == "Succeeded", job["status"]
    # Not a hang: the chain re-links once the source's Lease expires (6 s), and the
    # re-linked pulls take ~3 s each.
    assert time.monotonic() - killed < 60
    after = entries(job)
    assert all(e["source"] != "trainer-0" for e in after.values()), after
    for pod, e in at_kill.items():
        if e.get("source") != "trainer-1" and e.get("phase") != "Done":
            assert after[pod]["attempts"] >= 2, f"{pod} must have been re-planned: {after[pod]}"
    assert_bytes(cluster, targets(cluster), want)
    delete_jobs_and_check_finalizers(cluster, ["refit"])


# -- a target's agent restarted mid-pull ----------------------------------------------------
class Engine(threading.Thread):
    """The inference engine of a target pod. It declares its layout (as an engine does at
    start), pauses when its agent asks, and between refits reads its weights; a read
    counts only when the agent's version header shows a published version (even epoch,
    non-empty) that is the same before and after the read. When its agent dies it drops
    its views and reconnects to the agent's successor."""

    def __init__(self, cluster: DevCluster, pod: str):
        super().__init__(daemon=True, name=f"engine-{pod}")
        self.cluster, self.pod = cluster, pod
        self.reads: list[tuple[float, str, str]] = []  # (time, version, digest)
        self.events: list[tuple[float, str]] = []
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                self._session()
            except KeyError:  # no agent serves the pod right now: wait for its successor
                time.sleep(0.05)
            except (ConnectionError, OSError) as exc:
                self.events.append((time.monotonic(), f"lost: {type(exc).__name__}"))
                time.sleep(0.05)

    def _session(self) -> None:
        from ferry_agent.client import EngineClient

        with EngineClient.connect(self.cluster.agents[self.pod].socket, timeout=30) as c:
            views = c.declare({t["name"]: (t["dtype"], tuple(t["shape"])) for t in LAYOUT})
            c.subscribe()
            self.events.append((time.monotonic(), "connected"))
            while not self.stop.is_set():
                refit = c.wait_refit(timeout=0.01)
                if refit is not None:
                    refit.ack()
                    version, ok = refit.wait_done(timeout=60)
                    self.events.append((time.monotonic(), f"resume:{version}:{ok}"))
                    views = c.attach()
                    continue
                before = c.status()
                if before["epoch"] % 2 or not before["version"]:
                    continue
                d = digest(views)
                after = c.status()
                key = ("version", "epoch", "generation")
                if all(before[k] == after[k] for k in key):
                    self.reads.append((time.monotonic(), before["version"], d))


# 24 MiB at 0.004 GB/s: ~6 s per pull, so the agent dies with part of v2 in its slabs.
@pytest.mark.cluster(sources=1, targets=1, env={"FERRY_PULL_MAX_GBPS": "0.004"})
def test_target_agent_restarted_mid_pull_never_half_applied(cluster: DevCluster) -> None:
    v1 = ready_source(cluster, "1", seed=1)
    api, ns, pod = cluster.api(), cluster.namespace, "inference-0"
    engine = Engine(cluster, pod)
    engine.start()
    poll(
        lambda: any(e == "connected" for _, e in engine.events), timeout=30, what="engine attached"
    )
    create(api, ns, "refitjobs", refitjob("load"))
    assert finished(cluster, "load")["status"]["phase"] == "Succeeded"
    poll(lambda: any(v == "1" for _, v, _ in engine.reads), timeout=30, what="engine reading v1")

    v2 = cluster.load_weights("trainer-0", "2", LAYOUT, seed=2)
    create(
        api,
        ns,
        "refitjobs",
        refitjob(
            "refit-2",
            version="2",
            strategy={"chunkBytes": 1 << 20},
            pause={"mode": "engine", "timeoutSeconds": 20},
        ),
    )
    poll(
        lambda: (
            (e := entries(get(api, "refitjobs", ns, "refit-2")).get(pod))
            and e.get("phase") == "Pulling"
            and 0 < (e.get("bytes") or 0) < LAYOUT_BYTES
        ),
        timeout=60,
        what="v2 half pulled",
    )
    node = node_of(cluster, pod)
    cluster.stop_agent(pod, kill=True)
    killed = time.monotonic()
    cluster.start_agent(pod, "target", node)

    job = finished(cluster, "refit-2")
    poll(lambda: any(v == "2" for _, v, _ in engine.reads), timeout=30, what="engine reading v2")
    engine.stop.set()
    engine.join(10)
    assert job["status"]["phase"] == "Succeeded", job["status"]
    assert entries(job)[pod]["attempts"] >= 2, entries(job)[pod]
    want = {"1": v1, "2": v2}
    bad = [(v, d[:12]) for _, v, d in engine.reads if want.get(v) != d]
    assert not bad, f"the engine read bytes that are not the version its agent published: {bad[:5]}"
    assert {v for t, v, _ in engine.reads if t < killed} == {"1"}
    assert {v for t, v, _ in engine.reads if t > killed} == {"2"}, engine.events
    assert any(e.startswith("lost") for _, e in engine.events), (
        "the engine must have seen its agent die"
    )
    assert cluster.weights_digest(pod) == v2
    delete_jobs_and_check_finalizers(cluster, ["load", "refit-2"])


# -- Leases expiring under load ------------------------------------------------------------
# 24 MiB at 0.01 GB/s: ~2.4 s per pull. Two sources, four targets, eight jobs (two per
# target, each job selecting one target) run at once when a source agent and a target
# agent are frozen with SIGSTOP: their Leases stop being renewed.
@pytest.mark.cluster(sources=2, targets=4, env={"FERRY_PULL_MAX_GBPS": "0.01"})
def test_lease_expires_under_load(cluster: DevCluster) -> None:
    want = ready_source(cluster)
    api, ns = cluster.api(), cluster.namespace
    pods = targets(cluster)
    label_pods(cluster, {p: {"slot": p} for p in pods})
    jobs = [f"job-{k}" for k in range(8)]
    for k, name in enumerate(jobs):
        create(
            api,
            ns,
            "refitjobs",
            refitjob(
                name,
                targets={"slot": pods[k % 4]},
                backoffLimit=3,
                strategy={"chunkBytes": 1 << 20},
            ),
        )

    def pulling_from(src: str) -> bool:
        return any(
            e.get("source") == src and e.get("phase") == "Pulling"
            for j in jobs
            for e in entries(get(api, "refitjobs", ns, j)).values()
        )

    poll(lambda: pulling_from("trainer-0"), timeout=60, what="a pull from trainer-0")
    frozen_target = "inference-3"
    for pod in ("trainer-0", frozen_target):
        os.killpg(cluster.agents[pod].proc.pid, signal.SIGSTOP)
    done_before = {
        j
        for j in jobs
        if entries(get(api, "refitjobs", ns, j)).get(frozen_target, {}).get("phase") == "Done"
    }
    try:
        # The last renewal the frozen source made; its Lease expires one duration later.
        lease = (
            k8s_client.CoordinationV1Api(api)
            .read_namespaced_lease("ferry-agent-trainer-0", ns)
            .spec
        )
        expires = lease.renew_time + timedelta(seconds=lease.lease_duration_seconds)

        def stale() -> bool:
            ws = get(api, "weightsources", ns, "policy")
            return any(
                m["pod"] == "trainer-0" and m.get("state") == "Stale"
                for m in ws["status"].get("members") or []
            )

        poll(stale, timeout=60, what="trainer-0 Stale")
        seen = datetime.now(UTC)
        assert seen <= expires + timedelta(seconds=lease.lease_duration_seconds), (
            f"Stale {(seen - expires).total_seconds():.1f}s after the Lease expired"
        )
        assert (
            cond(get(api, "weightsources", ns, "policy"), "Degraded")["reason"] == "ReplicasStale"
        )

        done = {name: finished(cluster, name) for name in jobs}
    finally:
        for pod in ("trainer-0", frozen_target):
            os.killpg(cluster.agents[pod].proc.pid, signal.SIGCONT)
    for name, job in done.items():
        if frozen_target in entries(job) and name not in done_before:
            # The lost Lease is counted once (issue 19: not once per reconcile): one retry
            # spent, then the job waits for the agent until its deadline.
            assert job["status"]["phase"] == "Failed", (name, job["status"])
            assert cond(job, "Failed")["reason"] == "DeadlineExceeded", (name, job["status"])
            lost = entries(job)[frozen_target]
            assert lost.get("reason") == "AgentUnavailable" and lost["attempts"] <= 2, (name, lost)
        else:
            assert job["status"]["phase"] == "Succeeded", (name, job["status"])
    assert any(frozen_target in entries(j) and n not in done_before for n, j in done.items())
    assert_bytes(cluster, [p for p in pods if p != frozen_target], want)
    # Thawed, the source renews its Lease and serves again.
    poll(
        lambda: get(api, "weightsources", ns, "policy")["status"].get("readyReplicas") == 2,
        timeout=30,
        what="trainer-0 Ready again",
    )
    delete_jobs_and_check_finalizers(cluster, jobs)


# -- a failed single-buffer pull (issue 19) ------------------------------------------------
# 24 MiB at 0.004 GB/s: ~6 s per pull; the source publishes another version mid-pull.
@pytest.mark.cluster(sources=1, targets=1, env={"FERRY_PULL_MAX_GBPS": "0.004"})
def test_failed_single_buffer_pull_says_no_version_on_the_job_and_the_weightsource(
    cluster: DevCluster,
) -> None:
    """A failed single-buffer pull leaves the engine with torn weights and a ready sidecar:
    now the target's job entry says its slabs hold no version, its member entry on a
    WeightSource over the serving pods says NoVersion with the failure's reason, and
    its /readyz fails until a pull succeeds."""
    import urllib.error
    import urllib.request

    from tests.e2e.faults.faults_helpers import weightsource

    ready_source(cluster, "1", seed=1)
    api, ns, pod = cluster.api(), cluster.namespace, "inference-0"
    create(api, ns, "weightsources", weightsource("fleet", app="inference"))
    create(api, ns, "refitjobs", refitjob("load"))
    assert finished(cluster, "load")["status"]["phase"] == "Succeeded"

    def member() -> dict[str, Any]:
        st = get(api, "weightsources", ns, "fleet").get("status") or {}
        return next((m for m in st.get("members") or [] if m["pod"] == pod), {})

    def readyz() -> int:
        port = cluster.agents[pod].metrics_port
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=5) as r:
                return int(r.status)
        except urllib.error.HTTPError as exc:
            return int(exc.code)

    poll(lambda: member().get("state") == "Ready", timeout=30, what="fleet member Ready on 1")
    assert readyz() == 200

    cluster.load_weights("trainer-0", "2", LAYOUT, seed=2)
    create(
        api,
        ns,
        "refitjobs",
        refitjob("refit-2", version="2", backoffLimit=0, strategy={"chunkBytes": 1 << 20}),
    )
    poll(
        lambda: (
            (e := entries(get(api, "refitjobs", ns, "refit-2")).get(pod))
            and e.get("phase") == "Pulling"
            and 0 < (e.get("bytes") or 0) < LAYOUT_BYTES
        ),
        timeout=60,
        what="v2 partly pulled",
    )
    cluster.load_weights("trainer-0", "3", LAYOUT, seed=3)  # version 2 is gone mid-pull

    job = finished(cluster, "refit-2")
    assert job["status"]["phase"] == "Failed", job["status"]
    entry = entries(job)[pod]
    assert entry["reason"] == "VersionChanged", entry
    assert "hold no version" in entry["message"], entry
    m = poll(
        lambda: (m := member()).get("state") == "NoVersion" and m,
        timeout=30,
        what="fleet member NoVersion",
    )
    assert m["reason"] == "VersionChanged" and not m.get("version"), m
    assert readyz() == 503

    create(api, ns, "refitjobs", refitjob("refit-3", version="3"))
    assert finished(cluster, "refit-3")["status"]["phase"] == "Succeeded"
    poll(
        lambda: (
            (m := member()).get("state") == "Ready"
            and m.get("version") == "3"
            and not m.get("reason")
        ),
        timeout=30,
        what="fleet member Ready on 3",
    )
    assert readyz() == 200
    delete_jobs_and_check_finalizers(cluster, ["load", "refit-2", "refit-3"])
