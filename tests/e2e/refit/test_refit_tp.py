"""End to end: tensor-parallel WeightSources and RefitJob transforms through the operator.

Real control plane, operator (with its injection webhook) and agent processes on
host memory. Source shards are cut from one full model with the same rules as
tests/e2e/transform; every target must hold exactly what a direct load of its
shard gives. The dev cluster, standing in for the kubelet, hands each agent
FERRY_TP_RANK from its pod's rank label, as the injected sidecar's downward-API
env says.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client as k8s_client

torch = pytest.importorskip("torch")
sys.path.insert(0, str(Path(__file__).parents[2] / "unit" / "transform"))

from reshard_sim import direct_load, full_weights, model  # noqa: E402

from ferry_agent.client import EngineClient  # noqa: E402
from ferry_agent.layout import TensorSpec  # noqa: E402
from ferry_agent.transform import fp8  # noqa: E402
from ferry_dev import manifests  # noqa: E402
from ferry_dev.cluster import DevCluster  # noqa: E402
from tests.kube_helpers import cond, create  # noqa: E402
from tests.kube_helpers import job_finished as finished  # noqa: E402
from tests.kube_helpers import source_serving as serving  # noqa: E402

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(400)]
RANK = "ferry.dev/tp-rank"
SHAPES = model(hidden=256, inter=384, layers=2, vocab=512)  # ~2.3 MB full


def weightsource(name: str, app: str, tp: int = 1, **layout: Any) -> dict[str, Any]:
    return manifests.weightsource(name, {"app": app}, layout={"tensorParallelSize": tp, **layout})


def refitjob(name: str, source: str, app: str, **spec: Any) -> dict[str, Any]:
    return manifests.refitjob(
        name, source, {"app": app}, **{"timeoutSeconds": 120, "pause": {"mode": "none"}, **spec}
    )


def load(c: DevCluster, pod: str, tensors: dict[str, Any], version: str) -> None:
    """What a trainer does: declare its tensors through the engine client, write, publish."""
    with EngineClient.connect(c.agents[pod].socket) as e:
        views = e.declare(
            {n: (str(t.dtype).removeprefix("torch."), tuple(t.shape)) for n, t in tensors.items()}
        )
        with e.writing(version):
            for n, t in tensors.items():
                views[n].copy_(t)


def assert_holds(c: DevCluster, pod: str, want: dict[str, Any]) -> None:
    with EngineClient.connect(c.agents[pod].socket) as e:
        got = e.attach()
        assert set(got) == set(want), pod
        for n, w in want.items():
            g = got[n]
            assert g.dtype == w.dtype and tuple(g.shape) == tuple(w.shape), (pod, n)
            assert torch.equal(g.view(torch.uint8), w.contiguous().view(torch.uint8)), (pod, n)


def add_pods(c: DevCluster, pods: dict[str, dict[str, str]], role: str) -> None:
    waits = [c.add_pod(name, role, labels, wait=False) for name, labels in pods.items()]
    for w in waits:
        if w is not None:
            w()


@pytest.mark.cluster(sources=0, targets=0)
def test_tp2_sources_reshard_to_tp1_three_refits_and_same_rank_pulls(cluster: DevCluster) -> None:
    c, api = cluster, cluster.api()
    create(api, c.namespace, "weightsources", weightsource("policy", "trainer", tp=2))
    add_pods(
        c,
        {"trainer-r0": {"app": "trainer", RANK: "0"}, "trainer-r1": {"app": "trainer", RANK: "1"}},
        "source",
    )
    add_pods(
        c,
        {
            "inference-0": {"app": "inference"},  # TP 1: no rank label needed
            "shard-0": {"app": "shard", RANK: "0"},
            "shard-1": {"app": "shard", RANK: "1"},
        },
        "target",
    )
    log = c.workdir / "agents" / "inference-0" / "agent.log"
    for cycle in (1, 2, 3):
        full = full_weights(SHAPES, seed=40 + cycle)
        for r in range(2):
            load(c, f"trainer-r{r}", direct_load(full, r, 2), f"step-{cycle}")
        ws = serving(c, "policy", f"step-{cycle}")
        if cycle == 1:
            assert cond(ws, "Ready")["status"] == "True", ws["status"]
            assert (
                ws["status"]["fingerprint"].startswith("tp2:")
                and ws["status"]["readySummary"] == "2/2"
            )
            assert {m["pod"]: m.get("rank") for m in ws["status"]["members"]} == {
                "trainer-r0": 0,
                "trainer-r1": 1,
            }
            pod = k8s_client.CoreV1Api(api).read_namespaced_pod("trainer-r1", c.namespace)
            agent = next(x for x in pod.spec.init_containers if x.name == "ferry-agent")
            env = {e.name: e.value_from.field_ref.field_path for e in agent.env if e.value_from}
            assert env["FERRY_TP_RANK"] == f"metadata.labels['{RANK}']", (
                "the webhook injects the rank"
            )
        create(
            api,
            c.namespace,
            "refitjobs",
            refitjob(
                f"reshard-{cycle}",
                "policy",
                "inference",
                transform={"type": "reshard", "targetTensorParallelSize": 1},
            ),
        )
        job = finished(c, f"reshard-{cycle}")
        assert job["status"]["phase"] == "Succeeded", job["status"]
        (entry,) = job["status"]["targets"]
        assert entry["source"] == "trainer-r0,trainer-r1" and entry["bytes"] > 0
        assert_holds(
            c, "inference-0", direct_load(full, 0, 1)
        )  # equal to a fresh load, every cycle
        reused = log.read_text().count("plan reused")
        assert reused == cycle - 1, f"cycle {cycle}: the plan must be kept while nothing changed"
        if cycle == 1:  # TP 2 targets, no transform: each pulls its own rank's shard
            create(api, c.namespace, "refitjobs", refitjob("same-rank", "policy", "shard"))
            job = finished(c, "same-rank")
            assert job["status"]["phase"] == "Succeeded", job["status"]
            assert {e["pod"]: e["source"] for e in job["status"]["targets"]} == {
                "shard-0": "trainer-r0",
                "shard-1": "trainer-r1",
            }
            for r in range(2):
                assert_holds(c, f"shard-{r}", direct_load(full, r, 2))


@pytest.mark.cluster(sources=0, targets=0)
def test_tp1_source_reshards_to_tp2_targets_and_fp8_block_needs_a_quantized_source(
    cluster: DevCluster,
) -> None:
    c, api = cluster, cluster.api()
    create(api, c.namespace, "weightsources", weightsource("policy", "trainer"))
    create(
        api,
        c.namespace,
        "weightsources",
        weightsource("policy-fp8", "trainer-fp8", quantization="fp8-block"),
    )
    add_pods(c, {"trainer-0": {"app": "trainer"}, "trainer-fp8": {"app": "trainer-fp8"}}, "source")
    add_pods(
        c,
        {
            "inference-0": {"app": "inference", RANK: "0"},
            "inference-1": {"app": "inference", RANK: "1"},
            "inference-fp8": {"app": "inference-fp8"},
        },
        "target",
    )
    full = full_weights(SHAPES, seed=5)
    load(c, "trainer-0", full, "v1")
    serving(c, "policy", "v1")
    create(
        api,
        c.namespace,
        "refitjobs",
        refitjob(
            "reshard",
            "policy",
            "inference",
            transform={"type": "reshard", "targetTensorParallelSize": 2},
        ),
    )
    job = finished(c, "reshard")
    assert job["status"]["phase"] == "Succeeded", job["status"]
    for r in range(2):
        assert_holds(c, f"inference-{r}", direct_load(full, r, 2))

    # A target without the rank label fails with a reason naming the label (no agent needed).
    c.add_pod("unlabelled", "target", {"app": "unlabelled"}, start_agent=False)
    create(
        api,
        c.namespace,
        "refitjobs",
        refitjob(
            "no-rank",
            "policy",
            "unlabelled",
            transform={"type": "reshard", "targetTensorParallelSize": 2},
        ),
    )
    job = finished(c, "no-rank")
    (entry,) = job["status"]["targets"]
    assert (
        entry["phase"] == "Failed"
        and entry["reason"] == "MissingRankLabel"
        and RANK in entry["message"]
    )
    assert (
        job["status"]["phase"] == "Failed" and cond(job, "Failed")["reason"] == "MissingRankLabel"
    )

    # fp8-block from a source that does not publish FP8: refused before any transfer.
    create(
        api,
        c.namespace,
        "refitjobs",
        refitjob("fp8-refused", "policy", "inference-fp8", transform={"type": "fp8-block"}),
    )
    job = finished(c, "fp8-refused", timeout=30)
    failed = cond(job, "Failed")
    assert job["status"]["phase"] == "Failed" and failed["reason"] == "SourceNotQuantized"
    assert "spec.layout.quantization: fp8-block" in failed["message"] and not job["status"].get(
        "targets"
    )

    # With a source that declares (and publishes) fp8-block: a plain pull of FP8 + scales.
    bf16 = {n: w for n, w in full.items() if w.dtype == torch.bfloat16}
    specs = fp8.fp8_specs([TensorSpec(n, "bfloat16", tuple(w.shape)) for n, w in bf16.items()])
    with EngineClient.connect(c.agents["trainer-fp8"].socket) as e:
        views = e.declare(specs)
        with e.writing("v1"):
            fp8.publish_into(bf16, views)
        published = {n: v.clone() for n, v in views.items()}
    serving(c, "policy-fp8", "v1")
    create(
        api,
        c.namespace,
        "refitjobs",
        refitjob("fp8", "policy-fp8", "inference-fp8", transform={"type": "fp8-block"}),
    )
    job = finished(c, "fp8")
    assert job["status"]["phase"] == "Succeeded", job["status"]
    assert any(v.dtype == torch.float8_e4m3fn for v in published.values())
    assert_holds(c, "inference-fp8", published)
