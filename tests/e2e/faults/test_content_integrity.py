"""Content integrity through the operator: a source whose bytes were changed after it
published (one byte written straight into its slab) fails the target's attempt with
DigestMismatch; the operator retries on the other source and the job succeeds with the
right bytes, the WeightSource showing the version's digest."""

from __future__ import annotations

import pytest
from kubernetes import client as k8s_client

from ferry_agent.client import EngineClient
from ferry_dev.cluster import DevCluster
from tests.e2e.faults.faults_helpers import (
    assert_bytes,
    delete_jobs_and_check_finalizers,
    entries,
    finished,
    ready_source,
    refitjob,
)
from tests.kube_helpers import create, get

pytestmark = pytest.mark.e2e


def _first_pick(c: DevCluster, target: str, sources: list[str]) -> str:
    """The source the planner assigns first: same node as the target, then by name."""
    core = k8s_client.CoreV1Api(c.api())
    node = {p: core.read_namespaced_pod(p, c.namespace).spec.node_name for p in [target, *sources]}
    return min(sources, key=lambda p: (node[p] != node[target], p))


def _flip_one_byte(c: DevCluster, pod: str) -> None:
    import torch

    with EngineClient.connect(c.agents[pod].socket) as e:
        views = e.attach()
        name = sorted(views)[len(views) // 2]
        raw = views[name].view(-1).view(torch.uint8)
        raw[raw.numel() // 2] ^= 0x20  # no begin_write: the agent still serves the version


@pytest.mark.cluster(sources=2, targets=1)
def test_flipped_source_bytes_are_refused_and_the_job_retries_on_another_source(
    cluster: DevCluster,
) -> None:
    want = ready_source(cluster, "1", seed=1)
    api, ns, target = cluster.api(), cluster.namespace, "inference-0"
    sources = sorted(p for p, a in cluster.agents.items() if a.role == "source")
    bad = _first_pick(cluster, target, sources)
    _flip_one_byte(cluster, bad)

    create(api, ns, "refitjobs", refitjob("load", verify="full"))
    job = finished(cluster, "load")
    assert job["status"]["phase"] == "Succeeded", job["status"]
    entry = entries(job)[target]
    assert entry["attempts"] >= 2 and bad not in entry["source"].split(","), entry
    assert_bytes(cluster, [target], want)
    log = cluster.agents[target].log.read_text()
    assert "DigestMismatch" in log, "the first attempt must have failed on the content check"

    ws = get(api, "weightsources", ns, "policy")["status"]
    digests = {m["pod"]: m.get("digest") for m in ws["members"]}
    assert ws["digest"].startswith("sha256:") and digests[sources[0]] == digests[sources[1]]
    delete_jobs_and_check_finalizers(cluster, ["load"])
