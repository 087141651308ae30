"""Selectors' label keys and values have Kubernetes label syntax in the model too (the
CRD's CEL and patterns are the apiserver's side: tests/integration/test_validation.py)."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from ferry_api.meta import LabelSelector, label_key_ok


@pytest.mark.parametrize("key", ["app", "ferry.dev/role", "a.b-c_d", "x" * 63, "p" * 253 + "/n"])
def test_valid_label_keys(key: str) -> None:
    assert label_key_ok(key)


@pytest.mark.parametrize(
    "key",
    [
        "",
        "app name",
        "-app",
        "app-",
        "Ferry.dev/app",
        "a/b/c",
        "x" * 64,
        "p" * 254 + "/n",
        "/app",
        "ferry.dev/",
    ],
)
def test_label_keys_in_selectors_refused_with_the_key_named(key: str) -> None:
    """Issue 19 (small ones, d): the model refuses what the apiserver refuses, naming it."""
    assert not label_key_ok(key)
    with pytest.raises(ValidationError, match="is not a label key") as err:
        LabelSelector.model_validate({"matchLabels": {key: "x"}})
    assert repr(key)[1:-1] in str(err.value) and "matchLabels" in str(err.value)
    with pytest.raises(ValidationError, match="key"):
        LabelSelector.model_validate({"matchExpressions": [{"key": key, "operator": "Exists"}]})


@pytest.mark.parametrize("value", ["trainer!", "-x", "x-", "a b", "v" * 64])
def test_label_values_in_selectors_refused(value: str) -> None:
    with pytest.raises(ValidationError, match="matchLabels"):
        LabelSelector.model_validate({"matchLabels": {"app": value}})
    with pytest.raises(ValidationError, match="values"):
        LabelSelector.model_validate(
            {"matchExpressions": [{"key": "app", "operator": "In", "values": [value]}]}
        )


def test_empty_label_value_is_valid() -> None:
    assert LabelSelector.model_validate({"matchLabels": {"app": ""}}).matches({"app": ""})
