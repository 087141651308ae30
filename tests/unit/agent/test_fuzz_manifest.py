"""Fuzzing what a peer sends: a malformed manifest never crashes the agent.

Manifests (mostly one field away from a good one: bad, huge or negative offsets and
sizes, unknown dtypes, negative or huge shapes, duplicate names, overlapping tensors,
tensors past their slab, bad slab descriptors, bad metadata, truncated or flipped
bytes) go through the real path: a gRPC server sends the bytes, `AgentClient.manifest`
decodes and validates them, then the planner (plain or reshard) plans against our
layout and the descriptor arrays are built. Property: a typed FerryError, or a plan
whose every READ lies inside a slab the peer declared and every write inside ours.

FERRY_FUZZ_EXAMPLES=N runs N random examples per test instead of the fixed CI set.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent import futures
from typing import Any

import grpc
import pytest
from hypothesis import event, example, given
from hypothesis import strategies as st

from ferry_agent.errors import FerryError
from ferry_agent.layout import DTYPE_SIZES, Layout, Placement, TensorSpec, plan_layout
from ferry_agent.manifest import Manifest, descriptor_arrays, pb
from ferry_agent.memory import SlabInfo
from ferry_agent.peer import AgentClient
from ferry_agent.planner import build_plan
from ferry_agent.transform.reshard import COLUMN, REPLICATED, ROW, plan_reshard, rule_for, segments
from tests.conftest import fuzz_examples

U64 = (1 << 64) - 1


class RawPeer:
    """A gRPC server answering GetManifest with whatever bytes the test sets."""

    def __init__(self) -> None:
        self.reply = b""
        self._lock = threading.Lock()
        handler = grpc.method_handlers_generic_handler(
            "ferry.agent.v1.FerryAgent",
            {"GetManifest": grpc.unary_unary_rpc_method_handler(self._get)},  # raw bytes both ways
        )
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=2), handlers=[handler])
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()
        self.client = AgentClient(f"127.0.0.1:{self.port}", "token", timeout=10)

    def _get(self, request: bytes, context: Any) -> bytes:
        return self.reply

    def manifest(self, data: bytes) -> Manifest:
        self.reply = data
        return self.client.manifest()

    def close(self) -> None:
        self.client.close()
        self.server.stop(0).wait()


@pytest.fixture(scope="module")
def peer() -> Iterator[RawPeer]:
    p = RawPeer()
    yield p
    p.close()


# ------------------------------------------------------------- generators

names = st.from_regex(r"\Amodel\.layers\.[0-9]\.[a-z]{1,6}\Z")
dtypes = st.sampled_from(sorted(DTYPE_SIZES))
shape = st.lists(st.integers(0, 40), min_size=0, max_size=3).map(tuple)
specs = st.lists(
    st.builds(TensorSpec, names, dtypes, shape), min_size=1, max_size=8, unique_by=lambda s: s.name
)
slab_sizes = st.sampled_from([256, 1024, 4096, 1 << 16])


def manifest_of(layout: Layout, base: int, memory: str = "host") -> Any:
    kind = "DRAM" if memory == "host" else "VRAM"
    slabs = tuple(
        SlabInfo(i, base + i * (1 << 32), n, kind, 0, "") for i, n in enumerate(layout.slab_sizes)
    )
    return Manifest(
        agent="peer.1",
        pod="src",
        namespace="ns",
        version="v1",
        epoch=2,
        fingerprint=layout.fingerprint,
        generation=1,
        memory=memory,
        tensors=layout.placements,
        slabs=slabs,
        nixl_metadata=b"md",
    ).to_proto()


BAD_INTS = [
    0,
    1,
    255,
    256,
    4095,
    4096,
    1 << 31,
    (1 << 32) - 1,
    1 << 40,
    (1 << 63) - 1,
    1 << 63,
    U64,
]
bad_int = st.one_of(st.sampled_from(BAD_INTS), st.integers(0, 1 << 20))
bad_dim = st.one_of(
    st.sampled_from([-1, -(1 << 63), 0, 1 << 31, (1 << 63) - 1]), st.integers(-5, 1 << 20)
)


@st.composite
def mutate(draw: st.DrawFn, m: Any) -> bytes:
    """One or two changes to manifest `m` (a protobuf), then its bytes, maybe damaged."""
    m = pb.Manifest.FromString(m.SerializeToString())
    for _ in range(draw(st.integers(0, 2))):
        what = draw(
            st.sampled_from(
                [
                    "offset",
                    "nbytes",
                    "slab",
                    "dtype",
                    "shape",
                    "name",
                    "duplicate",
                    "overlap",
                    "drop-tensor",
                    "slab-nbytes",
                    "slab-addr",
                    "slab-index",
                    "slab-memory",
                    "drop-slab",
                    "alignment",
                    "memory",
                    "metadata",
                    "add-tensor",
                ]
            )
        )
        t = m.tensors[draw(st.integers(0, len(m.tensors) - 1))] if m.tensors else None
        s = m.slabs[draw(st.integers(0, len(m.slabs) - 1))] if m.slabs else None
        if what == "offset" and t is not None:
            t.offset = draw(bad_int)
        elif what == "nbytes" and t is not None:
            t.nbytes = draw(bad_int)
        elif what == "slab" and t is not None:
            t.slab = draw(st.one_of(st.integers(0, 3), st.just((1 << 32) - 1)))
        elif what == "dtype" and t is not None:
            t.dtype = draw(
                st.one_of(dtypes, st.sampled_from(["", "float4", "object", "complex64"]))
            )
        elif what == "shape" and t is not None:
            dims = draw(st.lists(bad_dim, max_size=4))
            del t.shape[:]
            t.shape.extend(dims)
        elif what == "name" and t is not None:
            t.name = draw(st.one_of(st.just(""), st.text(max_size=8), names))
        elif what == "duplicate" and t is not None:
            m.tensors.add().CopyFrom(t)
        elif what == "overlap" and t is not None and len(m.tensors) > 1:
            other = m.tensors[draw(st.integers(0, len(m.tensors) - 1))]
            t.slab, t.offset = other.slab, other.offset + draw(st.integers(0, 8))
        elif what == "drop-tensor" and t is not None:
            m.tensors.remove(t)
        elif what == "add-tensor":
            n = m.tensors.add(
                name=draw(names),
                dtype=draw(dtypes),
                slab=draw(st.integers(0, 2)),
                offset=draw(bad_int),
            )
            n.shape.extend(draw(st.lists(st.integers(0, 64), max_size=2)))
            n.nbytes = draw(st.one_of(bad_int, st.just(0)))
        elif what == "slab-nbytes" and s is not None:
            s.nbytes = draw(bad_int)
        elif what == "slab-addr" and s is not None:
            s.addr = draw(st.sampled_from([0, U64, U64 - 255, 1 << 63]))
        elif what == "slab-index" and s is not None:
            s.index = draw(st.integers(0, 3))
        elif what == "slab-memory" and s is not None:
            s.memory = draw(st.sampled_from(["", "FILE", "VRAM", "DRAM", "dram"]))
        elif what == "drop-slab" and s is not None:
            m.slabs.remove(s)
        elif what == "alignment":
            m.alignment = draw(st.sampled_from([0, 1, 3, 255, 256, 4096, 1 << 31, (1 << 32) - 1]))
        elif what == "memory":
            m.memory = draw(st.sampled_from(["", "host", "cuda", "disk"]))
        elif what == "metadata":
            m.nixl_metadata = draw(st.binary(max_size=64))
    data = m.SerializeToString()
    damage = draw(st.integers(0, 11))  # a quarter damaged: the rest reach validation
    if damage == 0 and data:
        data = data[: draw(st.integers(0, len(data) - 1))]  # truncated
    elif damage == 1 and data:
        i = draw(st.integers(0, len(data) - 1))
        data = data[:i] + bytes([data[i] ^ draw(st.integers(1, 255))]) + data[i + 1 :]
    elif damage == 2:
        data = draw(st.binary(max_size=256))
    return data


@st.composite
def plain_case(draw: st.DrawFn) -> tuple[Layout, list[bytes], int]:
    """Our layout, the manifests of one to three sources holding the same tensors, a chunk size."""
    sp = draw(specs)
    ours = plan_layout(sp, draw(slab_sizes))
    sources = []
    for k in range(draw(st.integers(1, 3))):
        theirs = plan_layout(sp, draw(slab_sizes)) if draw(st.booleans()) else ours
        good = manifest_of(theirs, 0x7F00_0000_0000 + (k << 40))
        sources.append(
            draw(mutate(good)) if k == 0 or draw(st.booleans()) else good.SerializeToString()
        )
    return ours, sources, draw(st.sampled_from([4096, 8192, 1 << 20]))


# ------------------------------------------------------------- properties


def inside(seg_slab: int, off: int, n: int, sizes: dict[int, int]) -> bool:
    return seg_slab in sizes and 0 <= off and 0 <= n and off + n <= sizes[seg_slab]


def assert_plain_plan_safe(ours: Layout, mans: list[Manifest], chunk_bytes: int) -> None:
    plan = build_plan([m.tensors for m in mans], ours.placements, chunk_bytes=chunk_bytes)
    mine = {i: n for i, n in enumerate(ours.slab_sizes)}
    local = [SlabInfo(i, 0x1000_0000 + (i << 32), n, "DRAM", 0, "") for i, n in mine.items()]
    for k, man in enumerate(mans):
        theirs = {s.index: s.nbytes for s in man.slabs}
        segs = plan.for_source(k)
        for g in segs:
            assert inside(g.src_slab, g.src_offset, g.nbytes, theirs), (g, man.slabs)
            assert inside(g.dst_slab, g.dst_offset, g.nbytes, mine), (g, ours.slab_sizes)
        remote = descriptor_arrays(
            [(g.src_slab, g.src_offset, g.nbytes) for g in segs], list(man.slabs)
        )
        descriptor_arrays([(g.dst_slab, g.dst_offset, g.nbytes) for g in segs], local)
        assert all(int(a) + int(n) <= 1 << 64 for a, n, _ in remote.tolist())
    assert plan.bytes == ours.nbytes


@fuzz_examples(200)
@given(case=plain_case())
def test_malformed_manifest_gives_a_typed_error_or_an_in_bounds_plan(
    peer: RawPeer, case: Any
) -> None:
    ours, sources, chunk_bytes = case
    try:
        mans = [peer.manifest(data) for data in sources]
        assert_plain_plan_safe(ours, mans, chunk_bytes)
        event("plan")
    except FerryError as exc:
        event(exc.reason)
        assert exc.reason and exc.message


LAYOUT = plan_layout([TensorSpec("a", "bfloat16", (4, 8)), TensorSpec("b", "float32", (3,))], 4096)


def _regression(change: Any) -> bytes:
    m = manifest_of(LAYOUT, 0x7F00_0000_0000)
    change(m)
    return m.SerializeToString()


def _set(**kw: Any) -> Any:
    def change(m: Any) -> None:
        for key, value in kw.items():
            obj, field = key.split("__")
            target = m if obj == "m" else m.tensors[0] if obj == "t" else m.slabs[0]
            if field == "shape":
                del target.shape[:]
                target.shape.extend(value)
            else:
                setattr(target, field, value)

    return change


@pytest.mark.parametrize(
    ("case", "change"),
    [
        (
            "shape says more bytes than nbytes",
            _set(t__shape=[4, 8000]),
        ),  # reshard sized READs by shape
        ("negative dimension", _set(t__shape=[-4, -8])),  # TensorSpec raised ValueError on adopt
        ("unknown dtype", _set(t__dtype="float4")),
        ("slab past the end of memory", _set(s__addr=U64 - 16)),  # numpy OverflowError
        ("duplicate names", lambda m: m.tensors.add().CopyFrom(m.tensors[0])),
        ("overlapping tensors", _set(t__offset=250)),  # a (64 B) runs into b at 256
        ("bad alignment", _set(m__alignment=3)),
        ("bad memory", _set(m__memory="disk")),
        ("tensor in a missing slab", _set(t__slab=7)),
    ],
)
def test_regressions_are_typed_errors(peer: RawPeer, case: str, change: Any) -> None:
    with pytest.raises(FerryError) as err:
        peer.manifest(_regression(change))
    assert err.value.reason == "ManifestRejected" and err.value.fields["problem"], case


def test_truncated_bytes_are_a_peer_error(peer: RawPeer) -> None:
    data = manifest_of(LAYOUT, 0x7F00_0000_0000).SerializeToString()
    with pytest.raises(FerryError) as err:
        peer.manifest(data[:7])
    assert err.value.reason in ("PeerUnavailable", "ManifestRejected")


def test_a_good_manifest_plans() -> None:
    man = Manifest.from_proto(manifest_of(LAYOUT, 0x7F00_0000_0000))
    assert_plain_plan_safe(LAYOUT, [man], 4096)


# ------------------------------------------------------------- reshard

FAMILIES = {
    COLUMN: "model.layers.{i}.self_attn.q_proj.weight",
    ROW: "model.layers.{i}.self_attn.o_proj.weight",
    REPLICATED: "model.layers.{i}.input_layernorm.weight",
}


@st.composite
def reshard_case(draw: st.DrawFn) -> tuple[Layout, list[bytes], int, int]:
    """Full tensors split over S source ranks; we are rank r of T; one source manifest mutated."""
    src_tp, tgt_tp = draw(st.sampled_from([(1, 2), (2, 1), (2, 4), (4, 2), (2, 2), (3, 2)]))
    rank = draw(st.integers(0, tgt_tp - 1))
    full = []
    for i in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from([COLUMN, ROW, REPLICATED]))
        name = FAMILIES[kind].format(i=i)
        assert rule_for(name) == kind
        dims = (12 * draw(st.integers(1, 3)), 12 * draw(st.integers(1, 3)))
        full.append((name, kind, dims if kind != REPLICATED or draw(st.booleans()) else dims[:1]))
    dtype = draw(st.sampled_from(["bfloat16", "float32", "int8"]))

    def shard(tp: int) -> list[TensorSpec]:
        out = []
        for name, kind, dims in full:
            d = list(dims)
            if kind == COLUMN:
                d[0] //= tp
            elif kind == ROW and len(d) > 1:
                d[1] //= tp
            out.append(TensorSpec(name, dtype, tuple(d)))
        return out

    ours = plan_layout(shard(tgt_tp), draw(slab_sizes))
    sources = [
        manifest_of(plan_layout(shard(src_tp), draw(slab_sizes)), 0x7F00_0000_0000 + (k << 40))
        for k in range(src_tp)
    ]
    bad = draw(st.integers(0, src_tp))  # src_tp: none mutated, a valid reshard
    data = [draw(mutate(m)) if k == bad else m.SerializeToString() for k, m in enumerate(sources)]
    return ours, data, rank, tgt_tp


@fuzz_examples(200)
@given(case=reshard_case())
@example(
    case=(  # a peer's q_proj that is a scalar: sshape[0] raised IndexError
        plan_layout([TensorSpec("model.layers.0.self_attn.q_proj.weight", "float32", (4, 4))], 256),
        [
            manifest_of(
                plan_layout(
                    [TensorSpec("model.layers.0.self_attn.q_proj.weight", "float32", ())], 256
                ),
                0x7F00_0000_0000,
            ).SerializeToString()
        ]
        * 2,
        0,
        2,
    )
)
def test_reshard_planner_gives_a_typed_error_or_an_in_bounds_plan(peer: RawPeer, case: Any) -> None:
    ours, data, rank, tgt_tp = case
    try:
        mans = [peer.manifest(d) for d in data]
        plan = plan_reshard(
            [m.tensors for m in mans], ours.placements, target_rank=rank, target_tp=tgt_tp
        )
    except FerryError as exc:
        event(exc.reason)
        assert exc.reason and exc.message
        return
    event("plan")
    scratch = len(ours.slab_sizes)
    segs = segments(plan, [m.tensors for m in mans], ours.placements, scratch_slab=scratch)
    mine = {i: n for i, n in enumerate(ours.slab_sizes)} | {scratch: plan.scratch_bytes}
    for g in segs:
        theirs = {s.index: s.nbytes for s in mans[g.source].slabs}
        assert inside(g.src_slab, g.src_offset, g.nbytes, theirs), g
        assert inside(g.dst_slab, g.dst_offset, g.nbytes, mine), g
    by_name = {p.name: p for p in ours.placements}
    for pc in plan.pieces:
        src = {p.name: p for p in mans[pc.source].tensors}[pc.name]
        assert pc.src_offset + pc.nbytes <= src.nbytes, pc  # inside the source tensor
        if pc.direct:
            assert pc.dst_offset + pc.nbytes <= by_name[pc.name].nbytes, pc


def test_placement_helpers_agree() -> None:
    p = Placement("w", "float32", (2, 3), 0, 0, 24)
    assert p.spec.nbytes == p.nbytes
