"""RefitJob: resolve the version, find targets, report honest initial conditions."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from ferry_api.refitjob import RefitJob, RefitJobSpec

from ..conditions import Cond, is_true, set_conditions

KIND, PLURAL = RefitJob.KIND, RefitJob.PLURAL


def compute_status(spec: RefitJobSpec, status: dict[str, Any], generation: int,
                   source: dict[str, Any] | None, targets: list[str], now: datetime) -> dict[str, Any]:
    src_status = (source or {}).get("status") or {}
    out: dict[str, Any] = {"observedGeneration": generation}
    version = status.get("version")
    if version is None and spec.version != "latest":
        version = spec.version
    if version is None and src_status.get("version"):
        # `latest` resolves once, at the first reconcile that sees a versioned source.
        version = src_status["version"]
    if version is not None:
        out["version"] = version
    out["phase"] = status.get("phase") or "Pending"
    out["targetsSummary"] = f"0/{len(targets)}"

    name = spec.source_ref.name
    if source is None:
        progressing = Cond("Progressing", False, "SourceNotFound",
                           f"WeightSource {name!r} not found in this namespace; create it or fix spec.sourceRef.name")
    elif not is_true(src_status.get("conditions"), "Ready"):
        progressing = Cond("Progressing", False, "SourceNotReady",
                           f"WeightSource {name!r} has no Ready replica")
    elif not targets:
        progressing = Cond("Progressing", False, "NoTargets",
                           f"no pods match spec.targets ({spec.targets.to_label_selector()})")
    else:
        progressing = Cond("Progressing", False, "Pending",
                           f"{len(targets)} target(s) waiting for assignment")
    wanted = [
        progressing,
        Cond("Complete", False, "NotStarted", ""),
        Cond("Failed", False, "AsExpected", ""),
    ]
    out["conditions"] = set_conditions(status.get("conditions"), wanted, generation, now)
    return out
