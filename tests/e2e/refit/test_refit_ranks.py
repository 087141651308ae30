"""End to end: pods holding several tensor-parallel ranks (one agent, one local rank per
GPU; simulated in host memory) through the control plane.

Real control plane, operator and agent processes. Source shards are cut from one full
model with the same rules as tests/e2e/transform; every target rank must hold exactly
what a direct load of its shard gives. Global rank = pod rank * ranksPerPod + local rank.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
sys.path.insert(0, str(Path(__file__).parents[2] / "unit" / "transform"))

from reshard_sim import direct_load, full_weights, model  # noqa: E402

from ferry_agent.client import EngineClient  # noqa: E402
from ferry_agent.errors import FerryError  # noqa: E402
from ferry_dev import manifests  # noqa: E402
from ferry_dev.cluster import DevCluster  # noqa: E402
from tests.kube_helpers import cond, create, get, wait_for  # noqa: E402
from tests.kube_helpers import job_finished as finished  # noqa: E402
from tests.kube_helpers import source_serving as serving  # noqa: E402

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(400)]
RANK = "ferry.dev/tp-rank"
SHAPES = model(hidden=256, inter=384, layers=2, vocab=512)  # ~2.3 MB full


def weightsource(name: str, app: str, tp: int, ranks_per_pod: int) -> dict[str, Any]:
    layout = {"tensorParallelSize": tp, "ranksPerPod": ranks_per_pod}
    return manifests.weightsource(name, {"app": app}, layout=layout)


def refitjob(name: str, source: str, app: str, **spec: Any) -> dict[str, Any]:
    return manifests.refitjob(
        name, source, {"app": app}, **{"timeoutSeconds": 120, "pause": {"mode": "none"}, **spec}
    )


def load(c: DevCluster, pod: str, rank: int, tensors: dict[str, Any], version: str) -> None:
    """What one engine worker (local rank `rank`) does: declare, write, publish."""
    with EngineClient.connect(c.agents[pod].socket, rank=rank) as e:
        views = e.declare(
            {n: (str(t.dtype).removeprefix("torch."), tuple(t.shape)) for n, t in tensors.items()}
        )
        with e.writing(version):
            for n, t in tensors.items():
                views[n].copy_(t)


def assert_holds(c: DevCluster, pod: str, rank: int, want: dict[str, Any]) -> None:
    with EngineClient.connect(c.agents[pod].socket, rank=rank) as e:
        got = e.attach()
        assert set(got) == set(want), (pod, rank)
        for n, w in want.items():
            g = got[n]
            assert g.dtype == w.dtype and tuple(g.shape) == tuple(w.shape), (pod, rank, n)
            assert torch.equal(g.view(torch.uint8), w.contiguous().view(torch.uint8)), (
                pod,
                rank,
                n,
            )


def add_pods(
    c: DevCluster,
    pods: dict[str, tuple[dict[str, str], int]],
    role: str,
    env: dict[str, str] | None = None,
) -> None:
    waits = [
        c.add_pod(name, role, labels, wait=False, ranks=n, env=env)
        for name, (labels, n) in pods.items()
    ]
    for w in waits:
        if w is not None:
            w()


def entry(ws: dict[str, Any], pod: str) -> dict[str, Any]:
    return next(m for m in ws["status"]["members"] if m["pod"] == pod)


@pytest.mark.cluster(sources=0, targets=0)
def test_two_rank_pod_refits_a_two_rank_pod_same_rank_and_one_rank_pods_feed_a_two_rank_pod(
    cluster: DevCluster,
) -> None:
    c, api = cluster, cluster.api()
    create(
        api, c.namespace, "weightsources", weightsource("policy", "trainer", tp=2, ranks_per_pod=2)
    )
    create(api, c.namespace, "weightsources", weightsource("split", "split", tp=2, ranks_per_pod=1))
    add_pods(
        c,
        {
            "trainer-0": ({"app": "trainer"}, 2),
            "split-r0": ({"app": "split", RANK: "0"}, 1),
            "split-r1": ({"app": "split", RANK: "1"}, 1),
        },
        "source",
    )
    add_pods(
        c, {"inference-0": ({"app": "inference"}, 2), "pair-0": ({"app": "pair"}, 2)}, "target"
    )
    full = full_weights(SHAPES, seed=21)
    for r in range(2):
        load(c, "trainer-0", r, direct_load(full, r, 2), "step-1")
        load(c, f"split-r{r}", 0, direct_load(full, r, 2), "step-1")
    ws = serving(c, "policy", "step-1")
    assert cond(ws, "Ready")["status"] == "True" and ws["status"]["readySummary"] == "1/1", ws[
        "status"
    ]
    m = entry(ws, "trainer-0")
    assert m["localRanks"] == 2 and m["state"] == "Ready" and "ranks" not in m, (
        "compact: one entry per pod"
    )
    split = serving(c, "split", "step-1")
    assert ws["status"]["fingerprint"] == split["status"]["fingerprint"], (
        "TP 2 in one pod has the fingerprint of TP 2 over two pods"
    )
    assert ws["status"]["bytes"] == split["status"]["bytes"] == m["bytes"]

    create(api, c.namespace, "refitjobs", refitjob("same-rank", "policy", "inference"))
    job = finished(c, "same-rank")
    assert job["status"]["phase"] == "Succeeded", job["status"]
    (e,) = job["status"]["targets"]
    assert e["source"] == "trainer-0/0|trainer-0/1" and e["bytes"] > 0
    for r in range(2):
        assert_holds(c, "inference-0", r, direct_load(full, r, 2))

    # The reverse: one-rank source pods feed the two local ranks of one target pod.
    create(api, c.namespace, "refitjobs", refitjob("pair", "split", "pair", targetRanksPerPod=2))
    job = finished(c, "pair")
    assert job["status"]["phase"] == "Succeeded", job["status"]
    assert job["status"]["targets"][0]["source"] == "split-r0|split-r1"
    for r in range(2):
        assert_holds(c, "pair-0", r, direct_load(full, r, 2))


@pytest.mark.cluster(sources=0, targets=0)
def test_tp2_in_one_pod_to_two_tp1_pods_by_reshard_and_to_two_one_rank_shards(
    cluster: DevCluster,
) -> None:
    c, api = cluster, cluster.api()
    create(
        api, c.namespace, "weightsources", weightsource("policy", "trainer", tp=2, ranks_per_pod=2)
    )
    add_pods(c, {"trainer-0": ({"app": "trainer"}, 2)}, "source")
    add_pods(
        c,
        {
            "full-0": ({"app": "full"}, 1),
            "full-1": ({"app": "full"}, 1),
            "shard-0": ({"app": "shard", RANK: "0"}, 1),
            "shard-1": ({"app": "shard", RANK: "1"}, 1),
        },
        "target",
    )
    full = full_weights(SHAPES, seed=7)
    for r in range(2):
        load(c, "trainer-0", r, direct_load(full, r, 2), "v1")
    serving(c, "policy", "v1")

    create(
        api,
        c.namespace,
        "refitjobs",
        refitjob(
            "reshard",
            "policy",
            "full",
            transform={"type": "reshard", "targetTensorParallelSize": 1},
        ),
    )
    job = finished(c, "reshard")
    assert job["status"]["phase"] == "Succeeded", job["status"]
    assert {e["pod"]: e["source"] for e in job["status"]["targets"]} == {
        "full-0": "trainer-0/0,trainer-0/1",
        "full-1": "trainer-0/0,trainer-0/1",
    }
    for pod in ("full-0", "full-1"):
        assert_holds(c, pod, 0, direct_load(full, 0, 1))  # the whole model, as a fresh TP 1 load

    create(
        api, c.namespace, "refitjobs", refitjob("shards", "policy", "shard", targetRanksPerPod=1)
    )
    job = finished(c, "shards")
    assert job["status"]["phase"] == "Succeeded", job["status"]
    assert {e["pod"]: e["source"] for e in job["status"]["targets"]} == {
        "shard-0": "trainer-0/0",
        "shard-1": "trainer-0/1",
    }
    for r in range(2):
        assert_holds(c, f"shard-{r}", 0, direct_load(full, r, 2))


SMALL = {"w": torch.arange(1024, dtype=torch.float32)}  # 4 KiB
LARGE = {"w": torch.arange(1 << 20, dtype=torch.float32)}  # 4 MiB: past a 1 MiB --max-slab-bytes


@pytest.mark.cluster(sources=0, targets=0)
def test_a_failed_rank_is_reported_on_its_pods_entry(cluster: DevCluster) -> None:
    c, api = cluster, cluster.api()
    create(
        api, c.namespace, "weightsources", weightsource("policy", "trainer", tp=2, ranks_per_pod=2)
    )
    capped = {"FERRY_MAX_SLAB_BYTES": "1Mi"}
    add_pods(c, {"trainer-ok": ({"app": "trainer"}, 2)}, "source")
    add_pods(c, {"trainer-bad": ({"app": "trainer"}, 2)}, "source", env=capped)
    add_pods(c, {"inference-capped": ({"app": "inference"}, 2)}, "target", env=capped)
    load(c, "trainer-ok", 0, SMALL, "v1")
    load(c, "trainer-ok", 1, LARGE, "v1")
    load(c, "trainer-bad", 0, SMALL, "v1")
    with pytest.raises(FerryError) as err:  # its rank 1's slabs are refused: over the agent's limit
        load(c, "trainer-bad", 1, LARGE, "v1")
    assert err.value.reason == "LayoutTooLarge"

    ws = wait_for(
        lambda: (
            (o := get(api, "weightsources", c.namespace, "policy")).get("status", {}).get("members")
            and entry(o, "trainer-bad").get("state") == "Failed"
            and o
        ),
        timeout=30,
        what="trainer-bad reported Failed",
    )
    bad = entry(ws, "trainer-bad")
    assert bad["reason"] == "LayoutTooLarge" and bad["localRanks"] == 2
    (rank1,) = bad["ranks"]  # only the rank that differs is listed
    assert rank1["localRank"] == 1 and rank1["rank"] == 1 and rank1["state"] == "Failed"
    assert rank1["reason"] == "LayoutTooLarge" and "max-slab-bytes" in rank1["message"]
    ws = wait_for(
        lambda: (
            (o := get(api, "weightsources", c.namespace, "policy"))["status"].get("readySummary")
            == "1/2"
            and cond(o, "Degraded")["reason"] == "RankFailed"
            and o
        ),
        timeout=30,
        what="Degraded RankFailed",
    )
    assert cond(ws, "Ready")["status"] == "True", "the healthy pod still serves"
    assert "trainer-bad local rank 1 (rank 1): LayoutTooLarge" in cond(ws, "Degraded")["message"]
    assert "ranks" not in entry(ws, "trainer-ok")

    # A target whose rank 1 cannot hold its shard: the attempt fails, naming the rank.
    create(api, c.namespace, "refitjobs", refitjob("capped", "policy", "inference", backoffLimit=0))
    job = finished(c, "capped")
    (e,) = job["status"]["targets"]
    assert job["status"]["phase"] == "Failed" and e["source"] == "trainer-ok/0|trainer-ok/1", job[
        "status"
    ]
    assert e["reason"] == "LayoutTooLarge" and e["message"].startswith("local rank 1"), e
