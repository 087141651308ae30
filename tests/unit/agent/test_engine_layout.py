"""Pure parts of ferry_agent.engines: which tensors, names and dtypes; failed-refit states."""

from __future__ import annotations

import pytest

from ferry_agent.engines.layout import SharedStorageError, TensorInfo, plan_module_layout
from ferry_agent.engines.refit import EMPTY, WeightsState, failed_state


def info(name, dtype="float32", shape=(4, 4), storage=1000, offset=0, floating=True, identity=0):
    n = 1
    for d in shape:
        n *= d
    return TensorInfo(
        name,
        dtype,
        shape,
        floating,
        storage,
        offset,
        (shape[-1], 1)[: len(shape)],
        n * 4,
        identity=identity,
    )


def test_ties_are_one_entry_named_first_with_aliases():
    layout = plan_module_layout(
        [info("embed.weight"), info("norm", storage=2000), info("head.weight")]
    )
    assert [(e.name, e.aliases) for e in layout.entries] == [
        ("embed.weight", ("head.weight",)),
        ("norm", ()),
    ]


def test_same_object_on_meta_is_a_tie_without_storage():
    layout = plan_module_layout(
        [info("a", storage=0, identity=7), info("b", storage=0, identity=7)]
    )
    assert [(e.name, e.aliases) for e in layout.entries] == [("a", ("b",))]


def test_disjoint_views_of_one_storage_are_separate_tensors():
    layout = plan_module_layout([info("a", offset=0), info("b", offset=64)])
    assert [e.name for e in layout.entries] == ["a", "b"]


def test_overlapping_views_are_refused_naming_both():
    with pytest.raises(SharedStorageError, match="b and a share memory"):
        plan_module_layout([info("a", shape=(8, 4)), info("b", shape=(4, 4), offset=32)])


def test_filter_then_rename_then_cast_floating_only():
    layout = plan_module_layout(
        [
            info("trainer.w"),
            info("trainer.ids", dtype="int64", floating=False, storage=3000),
            info("value_head", storage=4000),
        ],
        cast="bfloat16",
        rename={"trainer.w": "w", "trainer.ids": "ids"},
        include=lambda n: n != "value_head",
    )
    assert [(e.name, e.source, e.dtype) for e in layout.entries] == [
        ("w", "trainer.w", "bfloat16"),
        ("ids", "trainer.ids", "int64"),
    ]


def test_two_tensors_renamed_to_one_name_are_refused():
    with pytest.raises(ValueError, match="both renamed to 'w'"):
        plan_module_layout([info("a"), info("b", storage=2)], rename=lambda n: "w")


def test_failed_refit_states():
    serving = WeightsState("v1", True, "Serving", "serving 'v1'")
    assert failed_state(serving, "v2", "v1").condition == "Unchanged"
    partial = failed_state(serving, "v2", "")
    assert (partial.condition, partial.version, partial.ok) == ("Partial", "", False)
    assert failed_state(EMPTY, "v1", "").condition == "Empty"
