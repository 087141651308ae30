"""The pure parts of ferry_agent.engines.sglang (no SGLang needed): which LoadConfigs pick
Ferry's loader, the session's order, and what a failing session leaves."""

from __future__ import annotations

from typing import Any

import pytest

from ferry_agent.engines.sglang import (
    LOADER_PATH,
    LoaderOptions,
    TensorMeta,
    apply_session,
    is_sglang_layout,
    session_calls,
    ticket_name,
    ticket_version,
)


def test_only_an_extra_config_with_ferry_picks_ferrys_loader():
    assert LoaderOptions.parse({}) is None
    assert LoaderOptions.parse("") is None
    assert LoaderOptions.parse({"other": 1}) is None
    assert LoaderOptions.parse('{"ferry": {}}') == LoaderOptions()
    opts = LoaderOptions.parse({"ferry": {"socket": "/s", "rank": 2, "wait_s": 5}})
    assert opts == LoaderOptions("/s", 2, 5.0)


@pytest.mark.parametrize(
    ("extra", "names"),
    [
        ({"ferry": {"sokcet": "/s"}}, "ferry.sokcet"),
        ({"ferry": {"rank": -1}}, "ferry.rank"),
        ({"ferry": "yes"}, "'ferry' must be an object"),
    ],
)
def test_a_bad_ferry_extra_config_names_the_field(extra, names):
    with pytest.raises(ValueError, match="model-loader-extra-config") as err:
        LoaderOptions.parse(extra)
    assert names in str(err.value)


def test_sglang_layout_only_when_the_slabs_hold_exactly_the_models_tensors():
    model = [
        TensorMeta("a.qkv_proj.weight", "bfloat16", (12, 4)),
        TensorMeta("b", "bfloat16", (4,)),
    ]
    assert is_sglang_layout(list(model), model)
    assert not is_sglang_layout(model[:1], model)
    hf = [TensorMeta("a.q_proj.weight", "bfloat16", (4, 4)), TensorMeta("b", "bfloat16", (4,))]
    assert not is_sglang_layout(hf, model)
    assert not is_sglang_layout(
        [TensorMeta("a.qkv_proj.weight", "float32", (12, 4)), model[1]], model
    )


def test_ticket_names_the_version_and_anything_else_is_refused():
    assert ticket_version([(ticket_name("step-7"), None)]) == "step-7"
    with pytest.raises(ValueError, match=LOADER_PATH):
        ticket_version([("model.embed_tokens.weight", None)])
    with pytest.raises(ValueError):
        ticket_version([(ticket_name("a"), None), (ticket_name("b"), None)])


def test_session_in_sglangs_order_tagged_with_the_ferry_version():
    calls = session_calls("step-3", ["p0", "p1"])
    assert [c.endpoint for c in calls] == [
        "/pause_generation",
        "/begin_weight_update",
        "/update_weights_from_tensor",
        "/end_weight_update",
        "/continue_generation",
    ]
    assert calls[0].body == {"mode": "retract"}
    update = calls[2].body
    assert update["serialized_named_tensors"] == ["p0", "p1"]
    assert update["weight_version"] == "step-3" and update["load_format"] == LOADER_PATH


class Recorder:
    def __init__(self, fail: str = "", raise_on: str = ""):
        self.calls: list[str] = []
        self.fail, self.raise_on = fail, raise_on

    def call(self, endpoint: str, body: dict[str, Any]) -> dict[str, Any]:
        self.calls.append(endpoint)
        if endpoint == self.raise_on:
            raise OSError("connection refused")
        if endpoint == self.fail:
            return {"success": False, "message": "boom"}
        return {"success": True}


def test_a_failed_update_still_ends_the_session_and_continues_generation():
    s = Recorder(fail="/update_weights_from_tensor")
    out = apply_session(s, "v2", ["p"])
    assert not out.ok and "boom" in out.error and "/update_weights_from_tensor" in out.error
    assert s.calls == [
        "/pause_generation",
        "/begin_weight_update",
        "/update_weights_from_tensor",
        "/end_weight_update",
        "/continue_generation",
    ]


def test_a_pause_that_errored_is_still_followed_by_continue():
    s = Recorder(raise_on="/pause_generation")
    out = apply_session(s, "v2", ["p"])
    assert not out.ok and "connection refused" in out.error
    assert s.calls == ["/pause_generation", "/continue_generation"]


def test_a_good_session_runs_each_call_once():
    s = Recorder()
    out = apply_session(s, "v2", ["p"])
    assert out.ok and out.calls == s.calls and len(s.calls) == 5


def test_a_continue_that_errors_is_reported_not_raised():
    s = Recorder(raise_on="/continue_generation")
    out = apply_session(s, "v2", ["p"])
    assert not out.ok and "continue_generation failed" in out.error
    assert s.calls[-1] == "/continue_generation"
