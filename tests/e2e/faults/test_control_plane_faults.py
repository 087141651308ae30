"""Faults of the control plane while real agents move real bytes: the operator
killed with SIGKILL and restarted, and kube-apiserver restarted, both mid-job.

Each test ends with every target's bytes checked against the source and every
job deleted (its finalizer released).
"""

from __future__ import annotations

import pytest
from kubernetes import client as k8s_client

from ferry_dev.cluster import DevCluster
from tests.e2e.faults.faults_helpers import (
    FINALIZER,
    LAYOUT,
    LAYOUT_BYTES,
    assert_bytes,
    delete_jobs_and_check_finalizers,
    entries,
    finished,
    job_or_none,
    lease_report,
    poll,
    ready_source,
    refitjob,
    targets,
)
from tests.kube_helpers import GROUP, VERSION, cond, create, get

pytestmark = pytest.mark.e2e


# 24 MiB at 0.01 GB/s: ~2.4 s per pull, so the kill lands mid-transfer.
@pytest.mark.cluster(sources=1, targets=3, env={"FERRY_PULL_MAX_GBPS": "0.01"})
def test_operator_sigkill_mid_job_restart_resumes_without_repeating_work(
    cluster: DevCluster,
) -> None:
    want = ready_source(cluster)
    api, ns = cluster.api(), cluster.namespace
    create(
        api,
        ns,
        "refitjobs",
        refitjob("refit", strategy={"type": "tree", "maxFanOut": 1, "chunkBytes": 1 << 20}),
    )
    # A job that waits for targets (none match): it holds a finalizer and is deleted
    # while no operator runs; the restarted operator must release it.
    create(api, ns, "refitjobs", refitjob("doomed", targets={"app": "nothing"}))
    poll(
        lambda: (
            FINALIZER in (get(api, "refitjobs", ns, "doomed")["metadata"].get("finalizers") or [])
        ),
        timeout=30,
        what="doomed's finalizer",
    )
    poll(
        lambda: any(
            e.get("phase") == "Pulling" and 0 < (e.get("bytes") or 0) < LAYOUT_BYTES
            for e in entries(get(api, "refitjobs", ns, "refit")).values()
        ),
        timeout=60,
        what="a pull with bytes landed",
    )

    cluster.stop_operator(kill=True)
    k8s_client.CustomObjectsApi(api).delete_namespaced_custom_object(
        GROUP, VERSION, ns, "refitjobs", "doomed"
    )
    # The data plane does not need the operator: the pull in flight finishes and is
    # reported on the agent's Lease, to be folded into the job once an operator runs.
    uid = get(api, "refitjobs", ns, "refit")["metadata"]["uid"]
    done_while_down = poll(
        lambda: [
            p for p in targets(cluster) if lease_report(api, ns, p, uid).get("phase") == "Done"
        ],
        timeout=60,
        what="a target Done while the operator is down",
    )
    assert job_or_none(api, ns, "doomed") is not None, (
        "nothing may release a finalizer without the operator"
    )
    before = entries(get(api, "refitjobs", ns, "refit"))

    cluster.start_operator()
    job = finished(cluster, "refit")
    assert job["status"]["phase"] == "Succeeded", job["status"]
    assert cond(job, "Complete")["status"] == "True"
    after = entries(job)
    for pod in done_while_down:
        assert after[pod]["attempts"] == before[pod]["attempts"], (
            f"{pod} was pulled again: {after[pod]}"
        )
    assert all(e["attempts"] == 1 for e in after.values()), after
    assert_bytes(cluster, targets(cluster), want)
    poll(
        lambda: job_or_none(api, ns, "doomed") is None,
        timeout=30,
        what="doomed released after restart",
    )
    delete_jobs_and_check_finalizers(cluster, ["refit"])


# 24 MiB at 0.01 GB/s per pull; the apiserver is away for longer than a pull, so
# targets finish (and must report Done) while it is down. The agents' Leases (15 s,
# the chart's default) outlive the outage.
@pytest.mark.cluster(sources=1, targets=3, lease_seconds=15, env={"FERRY_PULL_MAX_GBPS": "0.01"})
def test_apiserver_restart_mid_job(cluster: DevCluster) -> None:
    assert cluster.cp is not None and cluster.operator is not None
    want = ready_source(cluster)
    api, ns = cluster.api(), cluster.namespace
    create(
        api, ns, "refitjobs", refitjob("refit", strategy={"type": "direct", "chunkBytes": 1 << 20})
    )
    poll(
        lambda: (
            sum(
                e.get("phase") == "Pulling" and (e.get("bytes") or 0) > 0
                for e in entries(get(api, "refitjobs", ns, "refit")).values()
            )
            >= 2
        ),
        timeout=60,
        what="two pulls with bytes landed",
    )

    down = cluster.cp.restart_apiserver(down_seconds=3)
    job = finished(cluster, "refit")
    assert job["status"]["phase"] == "Succeeded", (down, job["status"])
    assert_bytes(cluster, targets(cluster), want)
    # Watches came back: a job created after the restart is seen and runs (a timer
    # alone would not create it), and /healthz (the canary through a watch) stays 200.
    v2 = cluster.load_weights("trainer-0", "2", LAYOUT, seed=2)
    create(api, ns, "refitjobs", refitjob("after", version="2", ttlSecondsAfterFinished=3))
    job2 = finished(cluster, "after")
    assert job2["status"]["phase"] == "Succeeded", job2["status"]
    assert_bytes(cluster, targets(cluster), v2)
    assert cluster.operator.healthz() == 200
    # ...and the finished job is deleted by its ttlSecondsAfterFinished (finalizer released).
    poll(
        lambda: job_or_none(api, ns, "after") is None, timeout=30, what="'after' deleted by its TTL"
    )
    delete_jobs_and_check_finalizers(cluster, ["refit", "after"])
