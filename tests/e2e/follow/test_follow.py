"""End to end: a RefitJob with `version: follow` keeps its targets on the source's
newest version (real apiserver, operator and agents; the control plane only sets up
who follows whom, each version travels agent to agent).

10 versions are published by the trainer with publish_and_wait; every target serves
each of them in order, a target added mid-run catches up, a target taken out of the
selector leaves, the bytes are verified at the end and the job's status converges.
"""

from __future__ import annotations

import pytest
from kubernetes import client as k8s_client

from ferry_agent.client import EngineClient
from ferry_dev.cluster import DevCluster, demo_layout, digest, fill
from tests.e2e.refit.test_refit import refitjob, weightsource
from tests.kube_helpers import GROUP, VERSION, cond, create, get, wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]
LAYOUT = demo_layout(24, 4 << 20)
VERSIONS = 10


def _followers(trainer: EngineClient) -> set[str]:
    return set(trainer.followers()["followers"])


def _history(c: DevCluster, pod: str) -> list[str]:
    with EngineClient.connect(c.agents[pod].socket) as e:
        (state,) = e.following().values() or [{"history": []}]
        return list(state["history"])


@pytest.mark.parametrize("strategy", ["direct", "chain"])
def test_follow_ten_versions_join_leave_and_status(cluster: DevCluster, strategy: str) -> None:
    api, ns = cluster.api(), cluster.namespace
    create(api, ns, "weightsources", weightsource())
    trainer = EngineClient.connect(cluster.agents["trainer-0"].socket, timeout=60)
    views = trainer.declare({t["name"]: (t["dtype"], tuple(t["shape"])) for t in LAYOUT})
    with trainer.writing("0"):
        fill(views, 0)
    wait_for(
        lambda: get(api, "weightsources", ns, "policy").get("status", {}).get("version") == "0",
        timeout=30,
        what="source serving 0",
    )

    create(api, ns, "refitjobs", refitjob("follow", version="follow", strategy={"type": strategy}))
    first = {"inference-0", "inference-1", "inference-2"}
    wait_for(lambda: _followers(trainer) == first, timeout=60, what="3 targets following")

    core = k8s_client.CoreV1Api(api)
    served: dict[str, list[str]] = {}
    for k in range(1, VERSIONS + 1):
        if k == 4:  # a target joins mid-run: it is assigned and catches up on subscribe
            cluster.add_pod("inference-3", "target", {"app": "inference"})
            wait_for(
                lambda: "inference-3" in _followers(trainer),
                timeout=60,
                what="inference-3 following",
            )
        if k == 7:  # a target leaves the selector: its follow assignment goes, it unsubscribes
            core.patch_namespaced_pod(
                "inference-0", ns, {"metadata": {"labels": {"app": "retired"}}}
            )
            wait_for(
                lambda: "inference-0" not in _followers(trainer),
                timeout=60,
                what="inference-0 gone",
            )
        trainer.begin_write()
        fill(views, k)
        res = trainer.publish_and_wait(str(k), timeout=60)
        assert res.ok, res.failed  # the trainer's blocking publish: every target served k
        served[str(k)] = sorted(res.targets)
        assert all(t.bytes > 0 for t in res.targets.values())

    assert served["1"] == sorted(first)
    assert served["5"] == sorted(first | {"inference-3"})
    assert served["7"] == ["inference-1", "inference-2", "inference-3"]
    want = digest(views)
    for pod in ("inference-1", "inference-2", "inference-3"):
        assert cluster.weights_digest(pod) == want, pod
    for pod in ("inference-1", "inference-2"):  # each version, in order
        assert _history(cluster, pod)[-VERSIONS:] == [str(k) for k in range(1, VERSIONS + 1)]
    assert _history(cluster, "inference-3")[-7:] == [str(k) for k in range(4, VERSIONS + 1)]
    assert _history(cluster, "inference-0") == []  # it stopped following
    assert cluster.weights_digest("inference-0") != want

    def converged():  # type: ignore[no-untyped-def]
        job = get(api, "refitjobs", ns, "follow")
        st = job.get("status") or {}
        synced = cond(job, "Synced") or {}
        return synced.get("status") == "True" and st.get("version") == str(VERSIONS) and job

    job = wait_for(converged, timeout=30, what="status Synced on the last version")
    st = job["status"]
    assert st["phase"] == "Following" and st["targetsSummary"] == "3/3"
    entries = {e["pod"]: e for e in st["targets"]}
    assert set(entries) == {"inference-1", "inference-2", "inference-3"}
    assert all(
        e["version"] == str(VERSIONS) and e["lastRefitTime"] and e["phase"] == "Done"
        for e in entries.values()
    )

    # Deleting the job takes the follow assignments off: every target unsubscribes.
    k8s_client.CustomObjectsApi(api).delete_namespaced_custom_object(
        GROUP, VERSION, ns, "refitjobs", "follow"
    )
    wait_for(lambda: _followers(trainer) == set(), timeout=60, what="followers gone after delete")
    trainer.close()
