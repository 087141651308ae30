from __future__ import annotations

import pytest

from ferry_agent.errors import ManifestRejected
from ferry_agent.layout import TensorSpec, plan_layout
from ferry_agent.manifest import Manifest, descriptor_arrays
from ferry_agent.proto import build
from ferry_agent.slabs import SlabInfo


def test_committed_grpc_stubs_are_fresh():
    assert build.stale() == [], "run `python -m ferry_agent.proto.build` and commit the stubs"


def _manifest(**kw) -> Manifest:
    lay = plan_layout([TensorSpec("a", "bfloat16", (4, 8)), TensorSpec("b", "int8", (3,))], 4096)
    base = dict(
        agent="ns.pod.1234",
        pod="pod",
        namespace="ns",
        version="v3",
        epoch=6,
        fingerprint=lay.fingerprint,
        generation=2,
        memory="host",
        tensors=lay.placements,
        slabs=(SlabInfo(0, 0x7F0000001000, 4096, "DRAM", 0, "shm-name"),),
        nixl_metadata=b"\x00md",
    )
    base.update(kw)
    return Manifest(**base)


def test_manifest_round_trips_through_typed_protobuf():
    m = _manifest()
    back = Manifest.from_proto(m.to_proto())
    assert back.tensors == m.tensors and back.version == "v3" and back.epoch == 6
    assert (
        back.slabs[0].addr == 0x7F0000001000 and back.slabs[0].handle == ""
    )  # shm names stay local
    assert back.nixl_metadata == b"\x00md"
    assert back.cache_key == m.cache_key
    assert not m.to_proto(with_metadata=False).nixl_metadata


def test_manifest_with_a_tensor_outside_its_slab_is_refused():
    m = _manifest(slabs=(SlabInfo(0, 0x1000, 16, "DRAM", 0, ""),))
    with pytest.raises(ManifestRejected, match="outside its slab"):
        Manifest.from_proto(m.to_proto())
    with pytest.raises(ManifestRejected, match="memory"):
        Manifest.from_proto(_manifest(slabs=(SlabInfo(0, 0x1000, 4096, "FILE", 0, ""),)).to_proto())


def test_descriptor_arrays_are_built_from_typed_fields_and_bounded():
    slabs = [SlabInfo(0, 1000, 100, "VRAM", 3, ""), SlabInfo(1, 5000, 50, "VRAM", 3, "")]
    arr = descriptor_arrays([(0, 10, 20), (1, 0, 50)], slabs)
    assert arr.tolist() == [[1010, 20, 3], [5000, 50, 3]]
    with pytest.raises(ValueError):
        descriptor_arrays([(1, 10, 50)], slabs)
