"""End to end: kubectl-style RefitJobs move real bytes between real agent processes.

Each test gets its own local cluster (etcd, kube-apiserver, the operator with
its webhook, pods bound to nodes, one agent process per pod). Bytes are
verified by hashing every tensor through the engine client on both sides.
"""

from __future__ import annotations

import math
import threading
import time
from typing import Any

import pytest
from kubernetes import client as k8s_client

from ferry_agent.layout import DTYPE_SIZES
from ferry_dev.cluster import DevCluster, demo_layout
from tests.kube_helpers import GROUP, VERSION, cond, create, get, wait_for

pytestmark = pytest.mark.e2e
LAYOUT = demo_layout(60, 24 << 20)
LAYOUT_BYTES = sum(DTYPE_SIZES[t["dtype"]] * math.prod(t["shape"]) for t in LAYOUT)


def weightsource(lease: int = 6) -> dict[str, Any]:
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "WeightSource",
        "metadata": {"name": "policy"},
        "spec": {
            "model": {"name": "tiny-llama"},
            "selector": {"matchLabels": {"app": "trainer"}},
            "memory": "host",
            "heartbeat": {"leaseDurationSeconds": lease, "renewIntervalSeconds": 1},
        },
    }


def refitjob(name: str, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "RefitJob",
        "metadata": {"name": name},
        "spec": {
            "sourceRef": {"name": "policy"},
            "targets": {"matchLabels": {"app": "inference"}},
            "timeoutSeconds": 120,
            **spec,
        },
    }


def ready_source(c: DevCluster, version: str = "1", seed: int = 1) -> str:
    api = c.api()
    create(api, c.namespace, "weightsources", weightsource())
    want = ""
    for pod, a in c.agents.items():
        if a.role == "source":
            want = c.load_weights(pod, version, LAYOUT, seed)
    wait_for(
        lambda: (
            get(api, "weightsources", c.namespace, "policy").get("status", {}).get("version")
            == version
        ),
        timeout=30,
        what=f"source serving {version}",
    )
    return want


def finished(c: DevCluster, name: str, timeout: float = 90) -> dict[str, Any]:
    api = c.api()
    return wait_for(
        lambda: (
            (o := get(api, "refitjobs", c.namespace, name)).get("status", {}).get("phase")
            in ("Succeeded", "Failed")
            and o
        ),
        timeout=timeout,
        what=f"{name} finished",
    )


def poll(fn: Any, timeout: float, what: str) -> Any:
    """wait_for at 50 ms: for tests that watch short-lived states."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if out := fn():
            return out
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def targets(c: DevCluster) -> list[str]:
    return sorted(p for p, a in c.agents.items() if a.role == "target")


@pytest.mark.parametrize("strategy", ["direct", "tree", "chain"])
def test_one_source_three_targets(cluster: DevCluster, strategy: str) -> None:
    want = ready_source(cluster)
    create(
        cluster.api(),
        cluster.namespace,
        "refitjobs",
        refitjob("refit", strategy={"type": strategy, "maxFanOut": 1 if strategy == "tree" else 4}),
    )
    job = finished(cluster, "refit")
    assert job["status"]["phase"] == "Succeeded", job["status"]
    assert cond(job, "Complete")["status"] == "True"
    assert job["status"]["targetsSummary"] == "3/3" and job["status"]["version"] == "1"
    for pod in targets(cluster):
        assert cluster.weights_digest(pod) == want, f"{pod} holds different bytes"
    sources = {e["pod"]: e["source"] for e in job["status"]["targets"]}
    if strategy == "chain":
        assert sorted(sources.values()) == sorted(["trainer-0", *targets(cluster)[:2]])
    if strategy == "tree":
        assert any(s.startswith("inference") for s in sources.values()), sources


# The progress timer 60 s apart: only the targets' reports can finish the job in time.
@pytest.mark.cluster(operator_env={"FERRY_JOB_CHECK_SECONDS": "60"})
def test_job_completes_on_its_targets_reports_not_the_progress_timer(cluster: DevCluster) -> None:
    want = ready_source(cluster)
    api = cluster.api()
    for k in range(
        2
    ):  # the second after the first: its Leases already carry a finished job's report
        t0 = time.monotonic()
        create(api, cluster.namespace, "refitjobs", refitjob(f"now-{k}"))
        job = finished(cluster, f"now-{k}", timeout=30)
        took = time.monotonic() - t0
        assert job["status"]["phase"] == "Succeeded", job["status"]
        assert took < 10, f"now-{k} took {took:.1f}s: it waited for a timer, not for its reports"
    # A job for a version not published yet waits for its source, then runs as soon as
    # the source's member shows it (the WeightSource's change), not at the timer.
    create(api, cluster.namespace, "refitjobs", refitjob("next", version="2"))
    time.sleep(1)
    t0 = time.monotonic()
    want = cluster.load_weights("trainer-0", "2", LAYOUT, seed=2)
    job = finished(cluster, "next", timeout=30)
    took = time.monotonic() - t0
    assert job["status"]["phase"] == "Succeeded" and job["status"]["version"] == "2", job["status"]
    assert took < 10, f"next took {took:.1f}s after the publish: it waited for a timer"
    for pod in targets(cluster):
        assert cluster.weights_digest(pod) == want


# Slow pulls (a bandwidth cap on the targets) so that a kill or delete lands mid-transfer.
@pytest.mark.cluster(sources=2, targets=2, env={"FERRY_PULL_MAX_GBPS": "0.01"})
def test_source_killed_mid_job_targets_reassigned(cluster: DevCluster) -> None:
    want = ready_source(cluster)
    api = cluster.api()
    create(api, cluster.namespace, "refitjobs", refitjob("refit", strategy={"chunkBytes": 1 << 20}))
    victim = wait_for(
        lambda: next(
            (
                e["source"]
                for e in get(api, "refitjobs", cluster.namespace, "refit")
                .get("status", {})
                .get("targets", [])
                if e.get("phase") == "Pulling"
            ),
            None,
        ),
        what="a pull in flight",
    )
    cluster.stop_agent(victim, kill=True)
    job = finished(cluster, "refit", timeout=120)
    assert job["status"]["phase"] == "Succeeded", job["status"]
    entries = {e["pod"]: e for e in job["status"]["targets"]}
    assert any(e["attempts"] >= 2 for e in entries.values()), "someone must have retried"
    assert all(e["source"] != victim for e in entries.values())
    for pod in targets(cluster):
        assert cluster.weights_digest(pod) == want


@pytest.mark.cluster(sources=1, targets=3)
def test_layout_mismatch_reported_memory_untouched_others_complete(cluster: DevCluster) -> None:
    want = ready_source(cluster)
    odd = [dict(t) for t in LAYOUT]
    odd[0]["dtype"] = "float16"
    before = cluster.load_weights("inference-2", "mine", odd, seed=99)
    create(cluster.api(), cluster.namespace, "refitjobs", refitjob("refit", backoffLimit=1))
    job = finished(cluster, "refit")
    entries = {e["pod"]: e for e in job["status"]["targets"]}
    assert entries["inference-2"]["phase"] == "Failed"
    assert entries["inference-2"]["reason"] == "LayoutMismatch"
    assert "layers.0.weight" in entries["inference-2"]["message"]
    assert cluster.weights_digest("inference-2") == before, "a refused pull must not touch memory"
    for pod in ("inference-0", "inference-1"):
        assert entries[pod]["phase"] == "Done" and cluster.weights_digest(pod) == want
    assert job["status"]["phase"] == "Failed" and cond(job, "Failed")["reason"] == "LayoutMismatch"


# 24 MiB at 0.004 GB/s: each pull would take ~6 s.
@pytest.mark.cluster(sources=1, targets=2, env={"FERRY_PULL_MAX_GBPS": "0.004"})
def test_deleting_a_running_job_cancels_it(cluster: DevCluster) -> None:
    ready_source(cluster)
    api = cluster.api()
    create(api, cluster.namespace, "refitjobs", refitjob("refit", strategy={"chunkBytes": 1 << 20}))
    wait_for(
        lambda: (
            [
                e.get("phase")
                for e in get(api, "refitjobs", cluster.namespace, "refit")
                .get("status", {})
                .get("targets", [])
            ]
            == ["Pulling", "Pulling"]
        ),
        what="both pulling",
    )
    assert (
        "ferry.dev/finalizer"
        in get(api, "refitjobs", cluster.namespace, "refit")["metadata"]["finalizers"]
    )
    time.sleep(1)  # some chunks land
    k8s_client.CustomObjectsApi(api).delete_namespaced_custom_object(
        GROUP, VERSION, cluster.namespace, "refitjobs", "refit"
    )
    started = time.monotonic()
    last: dict[str, dict[str, Any]] = {}

    def gone() -> bool:
        try:
            job = get(api, "refitjobs", cluster.namespace, "refit")
        except k8s_client.ApiException as exc:
            return exc.status == 404
        last.update({e["pod"]: e for e in job.get("status", {}).get("targets", [])})
        return False

    poll(gone, timeout=30, what="job deleted")
    elapsed = time.monotonic() - started
    # The finalizer holds the job until no target is Pulling: each agent reported its
    # cancelled pull before the job went away, long before a pull's natural ~6 s.
    for pod in targets(cluster):
        assert last[pod]["phase"] == "Failed" and last[pod]["reason"] == "Cancelled", last[pod]
        assert 0 < last[pod].get("bytes", 0) < LAYOUT_BYTES // 2, last[pod]
        log = cluster.workdir.joinpath("agents", pod, "agent.log").read_text()
        assert "Cancelled" in log, f"{pod} did not cancel its pull"
    assert elapsed < 4, f"{elapsed:.1f}s"


# 24 MiB at 0.004 GB/s: ~6 s per pull, so progress reports (1 s apart, folded into the
# job once a second) show up.
@pytest.mark.cluster(sources=1, targets=1, env={"FERRY_PULL_MAX_GBPS": "0.004"})
def test_progress_bytes_grow_on_the_cr_before_done(cluster: DevCluster) -> None:
    ready_source(cluster)
    api = cluster.api()
    create(api, cluster.namespace, "refitjobs", refitjob("refit", strategy={"chunkBytes": 1 << 20}))
    seen: list[tuple[str, int]] = []

    def done() -> bool:
        entries = (
            get(api, "refitjobs", cluster.namespace, "refit").get("status", {}).get("targets", [])
        )
        for e in entries:
            if not seen or seen[-1] != (e.get("phase"), e.get("bytes", 0)):
                seen.append((e.get("phase"), e.get("bytes", 0)))
        return any(e.get("phase") in ("Done", "Failed") for e in entries)

    poll(done, timeout=60, what="target done")
    total = LAYOUT_BYTES
    partial = [b for phase, b in seen if phase == "Pulling" and 0 < b < total]
    assert seen[-1][0] == "Done" and len(partial) >= 2, seen
    assert partial == sorted(partial), seen
    assert len(partial) <= 8, f"progress writes must be rate-limited (1/s for a ~6 s pull): {seen}"


# 24 MiB at 0.008 GB/s: one transfer takes ~3 s; store-and-forward through 3 links ~9 s.
@pytest.mark.cluster(sources=1, targets=3, env={"FERRY_PULL_MAX_GBPS": "0.008"})
def test_chain_relays_pipeline_chunks(cluster: DevCluster) -> None:
    want = ready_source(cluster)
    api = cluster.api()
    created = time.monotonic()
    create(
        api,
        cluster.namespace,
        "refitjobs",
        refitjob("refit", strategy={"type": "chain", "chunkBytes": 1 << 20}),
    )
    job = finished(cluster, "refit")
    wall = time.monotonic() - created
    assert job["status"]["phase"] == "Succeeded", job["status"]
    entries = {e["pod"]: e for e in job["status"]["targets"]}
    first = next(e for e in entries.values() if e["source"] == "trainer-0")
    for pod in targets(cluster):
        assert cluster.weights_digest(pod) == want
    # Each link read from a target that was still pulling.
    log = "".join(
        cluster.workdir.joinpath("agents", p, "agent.log").read_text() for p in targets(cluster)
    )
    assert log.count("relay") >= 2, "the downstream links did not follow as relays"
    assert wall < 2 * first["seconds"], (
        f"chain of 3 took {wall:.1f}s, one transfer {first['seconds']:.1f}s"
    )


@pytest.mark.cluster(sources=1, targets=1)
def test_agent_killed_goes_stale_within_one_lease(cluster: DevCluster) -> None:
    ready_source(cluster)
    api = cluster.api()
    killed = time.monotonic()
    cluster.stop_agent("trainer-0", kill=True)
    ws = wait_for(
        lambda: (
            (o := get(api, "weightsources", cluster.namespace, "policy"))["status"].get(
                "readyReplicas"
            )
            == 0
            and o
        ),
        timeout=30,
        what="source Stale",
    )
    elapsed = time.monotonic() - killed
    assert elapsed <= 2 * 6 + 2, f"{elapsed:.1f}s"  # expiry plus one lease duration (6 s)
    member = ws["status"]["members"][0]
    assert member["state"] == "Stale" and cond(ws, "Degraded")["reason"] == "ReplicasStale"


@pytest.mark.cluster(sources=1, targets=1)
def test_engine_never_reads_a_pull_in_progress(cluster: DevCluster) -> None:
    from ferry_agent.client import EngineClient

    v1 = ready_source(cluster, "1", seed=1)
    api = cluster.api()
    create(api, cluster.namespace, "refitjobs", refitjob("load"))
    assert finished(cluster, "load")["status"]["phase"] == "Succeeded"

    seen: list[str] = []
    stop = threading.Event()
    errors: list[str] = []

    def engine() -> None:
        from ferry_dev.cluster import digest

        with EngineClient.connect(cluster.agents["inference-0"].socket) as c:
            views = c.attach()
            c.subscribe()
            while not stop.is_set():
                refit = c.wait_refit(timeout=0.01)
                if refit is not None:
                    refit.ack()  # stop reading until the agent says the pull is over
                    version, ok = refit.wait_done(timeout=60)
                    seen.append(f"resume:{version}:{ok}")
                    views = c.attach()
                    continue
                seen.append(digest(views))

    t = threading.Thread(target=engine, daemon=True)
    t.start()
    wait_for(lambda: len(seen) >= 3, what="engine reading")
    v2 = cluster.load_weights("trainer-0", "2", LAYOUT, seed=2)
    wait_for(
        lambda: (
            get(api, "weightsources", cluster.namespace, "policy")["status"].get("version") == "2"
        ),
        what="source at 2",
    )
    create(
        api,
        cluster.namespace,
        "refitjobs",
        refitjob("refit-2", pause={"mode": "engine", "timeoutSeconds": 20}),
    )
    job = finished(cluster, "refit-2")
    time.sleep(0.5)
    stop.set()
    t.join(10)
    assert job["status"]["phase"] == "Succeeded", job["status"]
    assert not errors
    reads = [s for s in seen if not s.startswith("resume")]
    assert set(reads) <= {v1, v2}, "the engine saw bytes of a pull in progress"
    resume = seen.index("resume:2:True")
    assert all(s == v1 for s in seen[:resume]) and all(s == v2 for s in seen[resume + 1 :])
    assert seen[resume + 1 :], "the engine read again after resume"


# 24 MiB in 1 MiB chunks at 0.01 GB/s: the pull takes ~2.5 s; the engine may pause only
# for the swap. (In one 24 MiB chunk the cap would not slow the pull at all: the test
# then passed only while agents polled for assignments every 0.5 s.)
@pytest.mark.cluster(sources=1, targets=1, env={"FERRY_PULL_MAX_GBPS": "0.01"})
def test_double_buffer_engine_reads_through_the_pull(cluster: DevCluster) -> None:
    from ferry_agent.client import EngineClient
    from ferry_dev.cluster import digest

    v1 = ready_source(cluster, "1", seed=1)
    api = cluster.api()
    create(api, cluster.namespace, "refitjobs", refitjob("load"))
    assert finished(cluster, "load")["status"]["phase"] == "Succeeded"

    reads: list[tuple[float, str]] = []
    pauses: list[tuple[float, float, str, bool]] = []
    stop = threading.Event()

    def engine() -> None:
        with EngineClient.connect(cluster.agents["inference-0"].socket) as c:
            views = c.attach()
            c.subscribe()
            while not stop.is_set():
                refit = c.wait_refit(timeout=0.01)
                if refit is None:
                    reads.append((time.monotonic(), digest(views)))
                    continue
                t_ack = time.monotonic()
                refit.ack()
                version, ok = refit.wait_done(timeout=60)
                pauses.append((t_ack, time.monotonic(), version, ok))
                views = c.attach()  # the weights now live in the other slab set

    t = threading.Thread(target=engine, daemon=True)
    t.start()
    wait_for(lambda: len(reads) >= 3, what="engine reading")
    v2 = cluster.load_weights("trainer-0", "2", LAYOUT, seed=2)
    wait_for(
        lambda: (
            get(api, "weightsources", cluster.namespace, "policy")["status"].get("version") == "2"
        ),
        what="source at 2",
    )
    t0 = time.monotonic()
    create(
        api,
        cluster.namespace,
        "refitjobs",
        refitjob("refit-2", pause={"mode": "doubleBuffer"}, strategy={"chunkBytes": 1 << 20}),
    )
    job = finished(cluster, "refit-2")
    time.sleep(0.5)
    stop.set()
    t.join(10)
    assert job["status"]["phase"] == "Succeeded", job["status"]
    assert len(pauses) == 1 and pauses[0][2:] == ("2", True), pauses
    ack, resumed = pauses[0][:2]
    pull_s = next(e for e in job["status"]["targets"] if e["pod"] == "inference-0")["seconds"]
    before = [d for ts, d in reads if ts < ack]
    after = [d for ts, d in reads if ts > resumed]
    assert set(before) == {v1} and after and set(after) == {v2}
    # Each read hashes all 24 MiB; on 2 busy cores that is a few reads per second.
    assert len([ts for ts, _ in reads if t0 < ts < ack]) >= 2, (
        "the engine kept reading during the pull"
    )
    assert pull_s > 1.0, f"the capped pull took {pull_s:.2f}s"
    assert resumed - ack < 0.1 * pull_s, f"paused {resumed - ack:.3f}s of a {pull_s:.1f}s pull"


@pytest.mark.cluster(sources=1, targets=1)
def test_agents_run_with_their_pods_bound_token_under_the_admission_policy(
    cluster: DevCluster,
) -> None:
    """Each agent's credential is its own pod's bound token (what the kubelet mounts), so
    the refits above ran under the per-pod policy; with it, inference-0's agent cannot
    touch trainer-0's Lease."""
    from kubernetes import config as k8s_config

    from ferry_api import leases, ssa

    ns = cluster.namespace
    create(cluster.api(), ns, "weightsources", weightsource())
    wait_for(
        lambda: get(cluster.api(), "weightsources", ns, "policy").get("status", {}).get("members"),
        what="the source's entry, written with its pod's token",
    )
    target = k8s_config.new_client_from_config(
        config_file=str(cluster.workdir / "agents" / "inference-0" / "kubeconfig")
    )
    review = k8s_client.AuthenticationV1Api(target).create_self_subject_review({}).status.user_info
    assert review.extra["authentication.kubernetes.io/pod-name"] == ["inference-0"]
    assert review.username == f"system:serviceaccount:{ns}:default"
    with pytest.raises(k8s_client.ApiException) as err:
        leases.patch(
            target, ns, "trainer-0", {leases.REPORT + "x": '{"attempt":1}'}, ssa.AGENT_MANAGER
        )
    assert err.value.status == 403 and "ferry-agent-inference-0" in err.value.body
