"""WeightSource: aggregate the replicas' own entries into Ready / Degraded."""

from __future__ import annotations

from collections import Counter
from datetime import datetime
from typing import Any

from ferry_api.weightsource import WeightSource, WeightSourceSpec

from ..conditions import Cond, human_bytes, set_conditions

KIND, PLURAL = WeightSource.KIND, WeightSource.PLURAL


def effective_members(members: list[dict[str, Any]], live: set[str] | None) -> list[dict[str, Any]]:
    """Agents' entries with Stale applied where the agent's Lease expired or is gone."""
    if live is None:
        return members
    return [m if m.get("pod") in live or m.get("state") == "Stale" else {**m, "state": "Stale"}
            for m in members]


def selected_members(status: dict[str, Any], pods: list[str], live: set[str] | None) -> list[dict[str, Any]]:
    """The entries of the selected pods, with Stale applied (see effective_members)."""
    selected = set(pods)
    return effective_members([m for m in status.get("members") or [] if m.get("pod") in selected], live)


def stale_pods(members: list[dict[str, Any]]) -> list[str]:
    return [m["pod"] for m in members if m.get("state") == "Stale"]


def compute_status(
    spec: WeightSourceSpec, status: dict[str, Any], generation: int, pods: list[str], now: datetime,
    live: set[str] | None = None,
) -> dict[str, Any]:
    """Operator-owned status fields from the selected pods, the agents' entries and their Leases.

    `members` entries belong to the agents (one SSA field manager each). The
    operator only overrides `state` of an entry, to Stale when the agent's Lease
    (`live`: pods with a fresh Lease) expired, or to Mismatched when its layout
    differs from the others; once the agent is fresh again its own apply wins.
    """
    raw = selected_members(status, pods, None)
    members = effective_members(raw, live)
    ready = [m for m in members if m.get("state") == "Ready"]
    fingerprints = Counter(m.get("fingerprint") for m in ready if m.get("fingerprint"))
    majority_fp = fingerprints.most_common(1)[0][0] if fingerprints else None
    consistent = [m for m in ready if m.get("fingerprint") == majority_fp]
    versions = Counter(m.get("version") for m in consistent if m.get("version"))
    stale = stale_pods(members)
    mismatched = sorted(
        {m["pod"] for m in members if m.get("state") == "Mismatched"}
        | {m["pod"] for m in ready if m.get("fingerprint") != majority_fp}
    )

    if not pods:
        ready_c = Cond("Ready", False, "NoReplicas",
                       f"no pods match selector {spec.selector.to_label_selector()}")
    elif not consistent:
        ready_c = Cond("Ready", False, "NoReadyReplicas",
                       f"{len(pods)} pod(s) selected, none has reported Ready weights")
    else:
        ready_c = Cond("Ready", True, "ReplicasReady",
                       f"{len(consistent)}/{len(pods)} replicas serve version {versions.most_common(1)[0][0] if versions else '?'}")
    if mismatched:
        degraded = Cond("Degraded", True, "FingerprintMismatch",
                        f"replicas with a different layout are not served: {', '.join(mismatched[:5])}")
    elif stale:
        degraded = Cond("Degraded", True, "ReplicasStale",
                        f"replicas whose lease expired or that shut down: {', '.join(sorted(stale)[:5])}")
    elif pods and len(consistent) < len(pods):
        degraded = Cond("Degraded", True, "ReplicasNotReady",
                        f"{len(pods) - len(consistent)} of {len(pods)} replicas not Ready")
    else:
        degraded = Cond("Degraded", False, "AsExpected", "")

    overrides = [{"pod": m["pod"], "state": "Stale"} for m, r in zip(members, raw, strict=True)
                 if m.get("state") == "Stale" and r.get("state") != "Stale"]
    overrides += [{"pod": m["pod"], "state": "Mismatched"} for m in ready
                  if m.get("fingerprint") != majority_fp]
    ref = consistent[0] if consistent else {}
    out: dict[str, Any] = {
        "observedGeneration": generation,
        "conditions": set_conditions(status.get("conditions"), [ready_c, degraded], generation, now),
        "replicas": len(pods),
        "readyReplicas": len(consistent),
        "readySummary": f"{len(consistent)}/{len(pods)}",
    }
    if overrides:
        out["members"] = overrides
    if versions:
        out["version"] = versions.most_common(1)[0][0]
    if majority_fp:
        out["fingerprint"] = majority_fp
    for key in ("tensors", "bytes"):
        if ref.get(key) is not None:
            out[key] = ref[key]
    if ref.get("bytes") is not None:
        out["size"] = human_bytes(ref["bytes"])
    return out

