"""Issue 19: a manifest's claimed fingerprint must be its tensors' (recomputed), and a
pull request carries the WeightSource's bounds unchanged through gRPC."""

from __future__ import annotations

import pytest

from ferry_agent.errors import BadRequest, ManifestRejected
from ferry_agent.layout import TensorSpec, fingerprint, plan_layout
from ferry_agent.manifest import Manifest
from ferry_agent.memory import SlabInfo
from ferry_agent.proto import ferry_agent_pb2 as pb
from ferry_agent.request import PullRequest

SPECS = [TensorSpec(f"w.{i}", "bfloat16", (64, 32)) for i in range(4)]


def _manifest(fp: str) -> Manifest:
    layout = plan_layout(SPECS, 1 << 20)
    slabs = tuple(
        SlabInfo(i, 0x1000_0000 * (i + 1), n, "DRAM", 0, "")
        for i, n in enumerate(layout.slab_sizes)
    )
    return Manifest("a", "p", "ns", "v1", 2, fp, 1, "host", layout.placements, slabs)


def test_manifest_whose_fingerprint_is_not_its_tensors_is_rejected() -> None:
    _manifest(fingerprint(SPECS)).validate()
    claimed = fingerprint(SPECS[:2])
    with pytest.raises(ManifestRejected) as err:
        Manifest.from_proto(_manifest(claimed).to_proto())
    assert "fingerprint" in err.value.message and claimed in err.value.message


def test_pull_request_bounds_travel_through_grpc_and_are_checked() -> None:
    r = PullRequest(("h:1",), max_bytes=123, fingerprint="sha256:ab")
    back = PullRequest.from_proto(r.to_proto(pb))
    assert (back.max_bytes, back.fingerprint) == (123, "sha256:ab")
    plain = PullRequest.from_proto(PullRequest(("h:1",)).to_proto(pb))
    assert (plain.max_bytes, plain.fingerprint) == (None, None)
    with pytest.raises(BadRequest, match="max_bytes"):
        PullRequest(("h:1",), max_bytes=-1)


def test_a_jobs_pull_is_bounded_by_its_weightsources_status() -> None:
    from ferry_agent.k8s.transforms import source_bounds
    from ferry_api.objects import read
    from ferry_api.weightsource import WeightSource
    from tests.api_objects import served

    def ws(tp: int, **status: object) -> object:
        spec = {
            "model": {"name": "m"},
            "selector": {"matchLabels": {"app": "trainer"}},
            "layout": {"tensorParallelSize": tp},
        }
        return read(WeightSource, served(WeightSource, "policy", spec, status))

    one = ws(1, bytes=4096, fingerprint="sha256:ab")
    assert source_bounds(one, reshard=False) == {"max_bytes": 4096, "fingerprint": "sha256:ab"}
    # A reshard builds a shard of its own layout: no source fingerprint to hold it to.
    assert source_bounds(one, reshard=True) == {"max_bytes": 4096}
    # TP > 1: status.fingerprint is over all ranks (tp<S>:...), not one replica's.
    assert source_bounds(ws(2, bytes=8192, fingerprint="tp2:ff"), reshard=False) == {
        "max_bytes": 8192
    }
    assert source_bounds(ws(1), reshard=False) == {}
