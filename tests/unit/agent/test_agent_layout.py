from __future__ import annotations

import pytest

from ferry_agent.layout import ALIGNMENT, TensorSpec, fingerprint, plan_layout


def specs(*sizes: int, dtype: str = "uint8") -> list[TensorSpec]:
    return [TensorSpec(f"t{i}", dtype, (n,)) for i, n in enumerate(sizes)]


def test_tensors_keep_order_and_start_aligned():
    lay = plan_layout(specs(100, 300, 256, 1), slab_bytes=1 << 20)
    offs = [p.offset for p in lay.placements]
    assert offs == [0, 256, 768, 1024]
    assert all(o % ALIGNMENT == 0 for o in offs)
    assert lay.slab_sizes == (1024 + 256,)


def test_full_slab_spills_and_big_tensor_gets_its_own_slab():
    lay = plan_layout(specs(600, 600, 5000, 10), slab_bytes=1024)
    assert [p.slab for p in lay.placements] == [0, 1, 2, 3]
    assert lay.slab_sizes[2] == 5120  # larger than slab_bytes, alone in its slab
    assert lay.nbytes == 600 + 600 + 5000 + 10


def test_same_specs_same_placements_on_every_agent():
    a = plan_layout(specs(10, 20, 30), slab_bytes=4096)
    b = plan_layout(specs(10, 20, 30), slab_bytes=4096)
    assert a == b


def test_fingerprint_is_order_independent_and_sensitive_to_dtype_and_shape():
    s = [TensorSpec("a", "bfloat16", (2, 3)), TensorSpec("b", "float32", (4,))]
    assert fingerprint(s) == fingerprint(list(reversed(s)))
    assert fingerprint(s) != fingerprint([TensorSpec("a", "float16", (2, 3)), s[1]])
    assert fingerprint(s) != fingerprint([TensorSpec("a", "bfloat16", (3, 2)), s[1]])


def test_bad_specs_are_refused():
    with pytest.raises(ValueError, match="duplicate"):
        plan_layout([TensorSpec("a", "int8", (1,)), TensorSpec("a", "int8", (2,))], 1024)
    with pytest.raises(ValueError, match="unknown dtype"):
        TensorSpec("a", "complex32", (1,))
    with pytest.raises(ValueError, match="multiple"):
        plan_layout(specs(1), slab_bytes=1000)


def test_nbytes_by_dtype():
    assert TensorSpec("x", "bfloat16", (3, 5)).nbytes == 30
    assert TensorSpec("x", "float8_e4m3fn", (7,)).nbytes == 7
    assert TensorSpec("x", "int64", (0, 9)).nbytes == 0
