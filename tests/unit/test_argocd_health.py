"""Argo CD health Lua, run by a real Lua 5.1 interpreter (Argo CD's gopher-lua speaks 5.1)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from lupa import lua51

ARGOCD = Path(__file__).resolve().parents[2] / "charts" / "ferry" / "argocd" / "ferry.dev"


def to_lua(runtime: Any, value: Any) -> Any:
    if isinstance(value, dict):
        return runtime.table_from({k: to_lua(runtime, v) for k, v in value.items()})
    if isinstance(value, list):
        return runtime.table_from([to_lua(runtime, v) for v in value])
    return value


def health(kind: str, obj: dict) -> tuple[str, str]:
    runtime = lua51.LuaRuntime(unpack_returned_tuples=True)
    script = (ARGOCD / kind / "health.lua").read_text()
    fn = runtime.execute(f"return function(obj)\n{script}\nend")
    hs = fn(to_lua(runtime, obj))
    return hs["status"], hs["message"] or ""


def obj(gen: int, observed: int | None, *conds: tuple[str, str, str]) -> dict:
    status: dict[str, Any] = {
        "conditions": [
            {"type": t, "status": s, "reason": r, "message": f"{r} detail"} for t, s, r in conds
        ]
    }
    if observed is not None:
        status["observedGeneration"] = observed
    return {"metadata": {"generation": gen}, "status": status}


CASES = [
    ("WeightSource", {"metadata": {"generation": 1}}, "Progressing"),
    ("WeightSource", obj(2, 1, ("Ready", "True", "ReplicasReady")), "Progressing"),
    (
        "WeightSource",
        obj(1, 1, ("Ready", "True", "ReplicasReady"), ("Degraded", "False", "AsExpected")),
        "Healthy",
    ),
    (
        "WeightSource",
        obj(1, 1, ("Ready", "True", "ReplicasReady"), ("Degraded", "True", "ReplicasStale")),
        "Degraded",
    ),
    ("WeightSource", obj(1, 1, ("Ready", "False", "NoReadyReplicas")), "Progressing"),
    ("WeightSource", obj(1, 1, ("Ready", "False", "InvalidSpec")), "Degraded"),
    (
        "RefitJob",
        obj(1, 1, ("Progressing", "True", "Transferring"), ("Complete", "False", "NotStarted")),
        "Progressing",
    ),
    (
        "RefitJob",
        obj(1, 1, ("Complete", "True", "AllTargetsDone"), ("Failed", "False", "AsExpected")),
        "Healthy",
    ),
    (
        "RefitJob",
        obj(1, 1, ("Complete", "False", "NotStarted"), ("Failed", "True", "DeadlineExceeded")),
        "Degraded",
    ),
    ("RefitJob", obj(1, 1, ("Progressing", "False", "InvalidSpec")), "Degraded"),
    ("RefitJob", obj(3, 2, ("Complete", "True", "AllTargetsDone")), "Progressing"),
    (
        "ArtifactCache",
        obj(1, 1, ("Ready", "True", "CacheAvailable"), ("Degraded", "False", "AsExpected")),
        "Healthy",
    ),
    ("ArtifactCache", obj(1, 1, ("Ready", "False", "NoSource")), "Progressing"),
    (
        "ArtifactCache",
        obj(1, 1, ("Ready", "True", "CacheAvailable"), ("Degraded", "True", "InstallFailures")),
        "Degraded",
    ),
    ("ArtifactCache", obj(1, None), "Progressing"),
]


@pytest.mark.parametrize(("kind", "body", "expected"), CASES)
def test_health(kind: str, body: dict, expected: str) -> None:
    status, message = health(kind, body)
    assert status == expected
    assert message, "Argo CD shows the message; it should say why"


def test_degraded_message_names_reason() -> None:
    status, message = health("RefitJob", obj(1, 1, ("Failed", "True", "DeadlineExceeded")))
    assert status == "Degraded" and message.startswith("DeadlineExceeded")
