"""Content digests (digests.py): what they catch, how sampling covers a version, and that
the CUDA algorithm agrees with a reference (the device run is tests/gpu)."""

from __future__ import annotations

import numpy as np
import pytest

from ferry_agent import digests
from ferry_agent.digests import Digests, Piece
from ferry_agent.errors import DigestMismatch
from ferry_agent.layout import TensorSpec, plan_layout
from ferry_agent.slabs import HostSlab

M64 = (1 << 64) - 1


def mlh64_reference(data: bytes) -> int:
    """mlh64 in plain Python ints, straight from its definition."""
    padded = data + b"\0" * (-len(data) % 8)
    total = 0
    for i in range(len(padded) // 8):
        w = int.from_bytes(padded[8 * i : 8 * i + 8], "little")
        t = ((i * digests._MLH_G + w) * digests._MLH_C) & M64
        t ^= t >> 29
        total = (total + t) & M64
    return digests._fmix64(total ^ len(data))


@pytest.fixture
def host_weights():
    specs = [
        TensorSpec("a", "float32", (1000,)),
        TensorSpec("b", "uint8", (13,)),
        TensorSpec("c", "bfloat16", (3, 700)),
        TensorSpec("empty", "float32", (0,)),
    ]
    layout = plan_layout(specs, 1 << 20)
    slabs = [
        HostSlab.create(i, n, prefix="ferry-test-digests") for i, n in enumerate(layout.slab_sizes)
    ]
    rng = np.random.default_rng(7)
    for s in slabs:
        s.array[:] = rng.integers(0, 256, s.array.size, dtype=np.uint8)
    yield layout, slabs
    for s in slabs:
        s.close()


def test_mlh64_matches_its_definition_including_tails():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(1)
    for n in (0, 1, 7, 8, 9, 64, 1001):
        data = rng.integers(0, 256, n, dtype=np.uint8).tobytes()
        raw = (
            torch.frombuffer(bytearray(data), dtype=torch.uint8)
            if n
            else torch.zeros(0, dtype=torch.uint8)
        )
        assert digests.mlh64(raw) == mlh64_reference(data), n


def test_mlh64_blocks_agree_with_one_pass(monkeypatch):
    torch = pytest.importorskip("torch")
    raw = torch.randint(0, 256, (8 * 1000 + 3,), dtype=torch.uint8)
    whole = digests.mlh64(raw)
    monkeypatch.setattr(digests, "MLH_BLOCK_WORDS", 7)
    assert digests.mlh64(raw) == whole


@pytest.mark.parametrize("algorithm", ["crc32c", "mlh64"])
def test_one_flipped_byte_is_named_by_tensor_and_range(host_weights, algorithm):
    layout, slabs = host_weights
    want = digests.of_version("v1", slabs, layout.placements, "host", piece_bytes=1024)
    if algorithm == "mlh64":
        got = digests.compute(slabs, layout.placements, "mlh64", piece_bytes=1024)
        want = Digests("v1", "mlh64", 1024, _group(got))
    c = next(p for p in layout.placements if p.name == "c")
    slabs[c.slab].array[c.offset + 1500] ^= 0x01  # piece 1 of "c" (1024-byte pieces)
    got = digests.compute(slabs, layout.placements, want.algorithm, piece_bytes=1024)
    with pytest.raises(DigestMismatch) as err:
        digests.check(want, got, source="10.0.0.5:7470")
    assert err.value.reason == "DigestMismatch"
    assert err.value.fields["tensors"] == ["c"]
    assert "c: bytes [1024, 2048)" in err.value.fields["differences"][0]
    assert "10.0.0.5:7470" in err.value.message


def _group(got):
    out: dict[str, list[int]] = {}
    for (name, _k), d in got.items():
        out.setdefault(name, []).append(d)
    return {n: tuple(v) for n, v in out.items()}


def test_unchanged_bytes_pass_and_the_total_is_stable(host_weights):
    layout, slabs = host_weights
    d1 = digests.of_version("v1", slabs, layout.placements, "host")
    d2 = digests.of_version("v1", slabs, layout.placements, "host")
    digests.check(d1, digests.compute(slabs, layout.placements, "crc32c"))
    assert d1.total == d2.total and d1.total.startswith("sha256:")
    assert d1.tensors["empty"] == (digests.crc32c(b""),)
    slabs[0].array[layout.placements[0].offset] ^= 0xFF
    assert digests.of_version("v1", slabs, layout.placements, "host").total != d1.total


def test_moved_words_change_mlh64():
    torch = pytest.importorskip("torch")
    a = torch.arange(64, dtype=torch.uint8)
    b = a.clone().view(torch.int64)
    b[[0, 1]] = b[[1, 0]]
    assert digests.mlh64(a) != digests.mlh64(b.view(torch.uint8))


def test_pieces_cut_each_tensor_at_piece_bytes():
    specs = [TensorSpec("w", "uint8", (2500,)), TensorSpec("s", "uint8", (10,))]
    layout = plan_layout(specs, 1 << 20)
    assert digests.pieces(layout.placements, 1024) == [
        Piece("w", 0, 0, 1024),
        Piece("w", 1, 1024, 1024),
        Piece("w", 2, 2048, 452),
        Piece("s", 0, 0, 10),
    ]


def test_sampled_rounds_cover_every_piece_and_full_is_all():
    all_pieces = [Piece(f"t{i}", 0, 0, 1) for i in range(50)]
    seen: set[Piece] = set()
    per_round = []
    for r in range(digests.SAMPLE_EVERY):
        got = digests.select(all_pieces, "sampled", seed="agent-a", round=r)
        per_round.append(len(got))
        seen.update(got)
    assert seen == set(all_pieces)
    assert max(per_round) == 7  # ceil(50 / 8)
    assert digests.select(all_pieces, "sampled", seed="agent-a", round=3) == digests.select(
        all_pieces, "sampled", seed="agent-a", round=3
    )  # deterministic
    assert digests.select(all_pieces, "full", seed="x", round=0) == all_pieces
    assert digests.select(all_pieces, "off", seed="x", round=0) == []


def test_a_piece_missing_from_the_source_digests_is_a_mismatch():
    want = Digests("v1", "crc32c", 1024, {"a": (1,)})
    with pytest.raises(DigestMismatch, match="b"):
        digests.check(want, {("a", 0): 1, ("b", 0): 5})


def test_digests_travel_over_the_proto():
    from ferry_agent.proto import ferry_agent_pb2 as pb

    d = Digests("step-3", "mlh64", 1 << 24, {"x": (1, M64), "y": (0,)})
    back = Digests.from_proto(pb.DigestsReply.FromString(d.to_proto(pb).SerializeToString()))
    assert back == d and back.total == d.total


def test_a_deferred_record_is_fetched_only_when_asked_and_once():
    import threading

    from ferry_agent.errors import DigestsUnavailable

    calls = []
    d = Digests("v2", "crc32c", 1024, {"a": (7,)})

    def fetch():
        calls.append(1)
        return d

    book = digests.DigestBook(threading.RLock(), seed="t")
    book.adopt(digests.Deferred("v2", fetch))
    assert calls == []  # a `verify: off` pull publishes without waiting for the source
    assert book.get("v1") is None and calls == []
    assert book.get("v2") == d and book.get("v2") == d
    assert calls == [1]

    def unavailable():
        raise DigestsUnavailable("source gone", endpoint="x", version="v3")

    book.adopt(digests.Deferred("v3", unavailable))
    assert book.get("v3") is None  # served as "no digests", never an error to the asker
