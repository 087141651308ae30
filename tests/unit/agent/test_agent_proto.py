from __future__ import annotations

import pytest

from ferry_agent.errors import ManifestRejected
from ferry_agent.layout import TensorSpec, plan_layout
from ferry_agent.manifest import Manifest, descriptor_arrays
from ferry_agent.memory import SlabInfo
from ferry_agent.proto import build


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


def test_vram_manifest_carries_ipc_handles_and_locality_and_refuses_bad_handles():
    from ferry_agent.ipc import Locality

    handle = "ab" * 64
    m = _manifest(
        memory="cuda",
        slabs=(SlabInfo(0, 0x1000, 4096, "VRAM", 0, handle),),
        host_id="boot-1",
        device="0000:1B:00.0",
    )
    back = Manifest.from_proto(m.to_proto())
    assert back.slabs[0].handle == handle and (back.host_id, back.device) == (
        "boot-1",
        "0000:1B:00.0",
    )
    assert Locality("boot-1", "0000:1B:00.0").same_gpu(back)
    assert not Locality("boot-1", "0000:1C:00.0").same_gpu(back)  # another GPU of the host
    assert not Locality("boot-2", "0000:1B:00.0").same_gpu(back)  # the same slot elsewhere
    assert not Locality("boot-1", "").same_gpu(back)  # a host-memory agent
    bad = _manifest(memory="cuda", slabs=(SlabInfo(0, 0x1000, 4096, "VRAM", 0, "zz"),))
    with pytest.raises(ManifestRejected, match="IPC handle"):
        Manifest.from_proto(bad.to_proto())


def test_same_gpu_copies_merge_segments_that_continue_each_other():
    from ferry_agent.planner import Segment, joined

    chunks = [Segment(0, 0, o, 1, 4096 + o, 1 << 20) for o in range(0, 4 << 20, 1 << 20)]
    other = Segment(0, 2, 0, 1, 0, 4096)  # another source slab
    gap = Segment(0, 0, (4 << 20) + 512, 1, 4096 + (4 << 20) + 512, 100)  # padding between
    peer = Segment(1, 0, 4 << 20, 1, 4096 + (4 << 20), 100)  # continues both sides, other source
    got = joined([chunks[2], peer, other, chunks[0], gap, chunks[3], chunks[1]])
    assert got == [Segment(0, 0, 0, 1, 4096, 4 << 20), gap, other, peer]
