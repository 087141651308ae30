"""Parse a kubectl label selector (`app=x,tier in (a,b),!canary`) into the
matchLabels / matchExpressions form the RefitJob spec takes."""

from __future__ import annotations

import re
from typing import Any

_SET = re.compile(r"^\s*([\w./-]+)\s+(in|notin)\s+\((.*)\)\s*$")
_EQ = re.compile(r"^\s*([\w./-]+)\s*(==|=|!=)\s*([\w.-]*)\s*$")
_KEY = re.compile(r"^\s*(!?)\s*([\w./-]+)\s*$")


class SelectorError(ValueError):
    pass


def _split(text: str) -> list[str]:
    """Split on commas outside parentheses."""
    parts, depth, cur = [], 0, ""
    for ch in text:
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    parts.append(cur)
    return parts


def parse_selector(text: str) -> dict[str, Any]:
    labels: dict[str, str] = {}
    exprs: list[dict[str, Any]] = []
    for raw in _split(text):
        if not raw.strip():
            raise SelectorError(f"empty requirement in selector {text!r}")
        if m := _SET.match(raw):
            values = [v.strip() for v in m.group(3).split(",") if v.strip()]
            if not values:
                raise SelectorError(f"{raw.strip()!r}: a set needs at least one value")
            exprs.append(
                {
                    "key": m.group(1),
                    "operator": "In" if m.group(2) == "in" else "NotIn",
                    "values": values,
                }
            )
        elif m := _EQ.match(raw):
            key, op, value = m.groups()
            if op == "!=":
                exprs.append({"key": key, "operator": "NotIn", "values": [value]})
            elif labels.get(key, value) != value:
                raise SelectorError(
                    f"{key} is required to equal both {labels[key]!r} and {value!r}"
                )
            else:
                labels[key] = value
        elif m := _KEY.match(raw):
            exprs.append(
                {"key": m.group(2), "operator": "DoesNotExist" if m.group(1) else "Exists"}
            )
        else:
            raise SelectorError(
                f"cannot parse {raw.strip()!r} in selector {text!r} "
                "(use key=value, key!=value, key in (a,b), key notin (a,b), key or !key)"
            )
    out: dict[str, Any] = {}
    if labels:
        out["matchLabels"] = labels
    if exprs:
        out["matchExpressions"] = exprs
    return out
