"""Content digests of CUDA slabs (run on the accelerator machine): mlh64 computed on the
device agrees with the same bytes hashed on the host, catches one flipped byte, and
never copies the slab to the host; the bench line prints its cost per GiB."""

from __future__ import annotations

import time

import pytest

from ferry_agent import digests
from ferry_agent.errors import DigestMismatch
from ferry_agent.layout import TensorSpec, plan_layout

torch = pytest.importorskip("torch")

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.timeout(300),
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.fixture
def cuda_weights():
    from ferry_agent.cuda import CudaSlab

    specs = [TensorSpec(f"w.{i}", "bfloat16", (4096, 4096)) for i in range(8)]  # 256 MiB
    specs.append(TensorSpec("tail", "uint8", (13,)))
    layout = plan_layout(specs, 1 << 30)
    slabs = [CudaSlab.create(i, n, device=0) for i, n in enumerate(layout.slab_sizes)]
    for s in slabs:
        s.tensor().copy_(torch.randint(0, 256, (s.nbytes,), dtype=torch.uint8, device="cuda:0"))
    torch.cuda.synchronize()
    yield layout, slabs
    for s in slabs:
        s.close()


def test_device_mlh64_equals_host_mlh64_of_the_same_bytes(cuda_weights):
    layout, slabs = cuda_weights
    on_gpu = digests.of_version("v1", slabs, layout.placements, "cuda")
    assert on_gpu.algorithm == "mlh64"
    for p in layout.placements:
        host = slabs[p.slab].tensor()[p.offset : p.offset + p.nbytes].cpu()
        want = [digests.mlh64(host[pc.start : pc.start + pc.nbytes]) for pc in digests.pieces([p])]
        assert list(on_gpu.tensors[p.name]) == want, p.name


def test_one_flipped_byte_in_vram_is_named(cuda_weights):
    layout, slabs = cuda_weights
    want = digests.of_version("v1", slabs, layout.placements, "cuda")
    p = next(p for p in layout.placements if p.name == "w.5")
    raw = slabs[p.slab].tensor()
    raw[p.offset + 12345] ^= 1
    torch.cuda.synchronize()
    got = digests.compute(slabs, layout.placements, "mlh64")
    with pytest.raises(DigestMismatch) as err:
        digests.check(want, got)
    assert err.value.fields["tensors"] == ["w.5"]


def test_mlh64_cost_per_gib(cuda_weights, capsys):
    layout, slabs = cuda_weights
    total = sum(p.nbytes for p in layout.placements)
    digests.of_version("warm", slabs, layout.placements, "cuda")
    torch.cuda.synchronize()
    runs = []
    for _ in range(5):
        t0 = time.perf_counter()
        digests.of_version("v", slabs, layout.placements, "cuda")  # ends with a host sync
        runs.append(time.perf_counter() - t0)
    ms_per_gib = 1e3 * sorted(runs)[2] / (total / (1 << 30))
    with capsys.disabled():
        print(f"\nmlh64 on {torch.cuda.get_device_name(0)}: {ms_per_gib:.2f} ms/GiB")
    assert ms_per_gib < 100
