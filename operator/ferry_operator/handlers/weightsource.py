"""WeightSource: aggregate the replicas' own entries into Ready / Degraded.

With `spec.layout.tensorParallelSize` S > 1 every replica holds one rank's shard
(its agent reports `rank`, read from FERRY_TP_RANK). Fingerprints are compared per
rank (the majority of each rank wins), and the source is Ready only when every
rank 0..S-1 has a consistent Ready replica on one common version. A Ready replica
without a rank, or with a rank >= S, is not served and is flagged Mismatched.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import dataclass, field
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


def tp_fingerprint(per_rank: dict[int, str]) -> str:
    """status.fingerprint of a TP > 1 source: `tp<S>:` and the sha256 (hex) of the
    lines `<rank>=<fingerprint>` for ranks 0..S-1, joined by newlines. Stable: it
    changes only when some rank's layout changes."""
    lines = "\n".join(f"{r}={per_rank[r]}" for r in sorted(per_rank))
    return f"tp{len(per_rank)}:{hashlib.sha256(lines.encode()).hexdigest()}"


@dataclass
class Ranks:
    """Ready replicas seen per tensor-parallel rank (`tp` = spec.layout.tensorParallelSize)."""

    tp: int
    consistent: list[dict[str, Any]] = field(default_factory=list)  # rank's majority fingerprint
    mismatched: list[str] = field(default_factory=list)  # another fingerprint than their rank's
    unranked: list[str] = field(default_factory=list)  # no rank, or rank >= tp (tp > 1 only)
    fingerprints: dict[int, str] = field(default_factory=dict)  # rank -> majority fingerprint
    version: str | None = None  # served: every rank has a consistent replica on it
    missing: list[int] = field(default_factory=list)  # ranks without a consistent replica on `version`

    @property
    def fingerprint(self) -> str | None:
        if self.tp == 1:
            return self.fingerprints.get(0)
        return tp_fingerprint(self.fingerprints) if len(self.fingerprints) == self.tp else None

    def rank_of(self, member: dict[str, Any]) -> int:
        return 0 if self.tp == 1 else int(member["rank"])

    def serving(self, version: str | None) -> dict[int, list[dict[str, Any]]]:
        """Consistent replicas on `version` (None: any), by rank."""
        out: dict[int, list[dict[str, Any]]] = {r: [] for r in range(self.tp)}
        for m in self.consistent:
            if version is None or m.get("version") == version:
                out[self.rank_of(m)].append(m)
        return out


def ranks(tp: int, ready: list[dict[str, Any]]) -> Ranks:
    """Per-rank majority fingerprints and the version every rank serves (pure).

    With tp == 1 ranks are ignored: one majority fingerprint, the most common
    version among the consistent replicas."""
    out = Ranks(tp)
    by_rank: dict[int, list[dict[str, Any]]] = {}
    for m in ready:
        rank = m.get("rank")
        if tp > 1 and (not isinstance(rank, int) or not 0 <= rank < tp):
            out.unranked.append(m["pod"])
            continue
        by_rank.setdefault(0 if tp == 1 else rank, []).append(m)  # type: ignore[arg-type]
    for r, members in sorted(by_rank.items()):
        fps = Counter(str(m["fingerprint"]) for m in members if m.get("fingerprint"))
        if not fps:
            continue
        major = fps.most_common(1)[0][0]
        out.fingerprints[r] = major
        for m in members:
            if m.get("fingerprint") == major:
                out.consistent.append(m)
            else:
                out.mismatched.append(m["pod"])
    versions = Counter(m.get("version") for m in out.consistent if m.get("version"))
    if tp == 1:
        out.version = versions.most_common(1)[0][0] if versions else None
        return out
    # The version with a consistent replica on every rank; among several (a rolling
    # update), the one most replicas serve, then the name.
    covered = {v: {out.rank_of(m) for m in out.consistent if m.get("version") == v} for v in versions}
    full = sorted((v for v, rs in covered.items() if len(rs) == tp), key=lambda v: (-versions[v], v))
    if full:
        out.version = full[0]
    else:
        best = max(covered, key=lambda v: (len(covered[v]), versions[v]), default=None)
        have = covered.get(best, set()) if best else set()
        out.missing = [r for r in range(tp) if r not in have]
    return out


def compute_status(
    spec: WeightSourceSpec, status: dict[str, Any], generation: int, pods: list[str], now: datetime,
    live: set[str] | None = None,
) -> dict[str, Any]:
    """Operator-owned status fields from the selected pods, the agents' entries and their Leases.

    `members` entries belong to the agents (one SSA field manager each). The
    operator only overrides `state` of an entry, to Stale when the agent's Lease
    (`live`: pods with a fresh Lease) expired, or to Mismatched when its layout
    differs from the others of its rank (or it has no valid rank); once the agent
    is fresh again its own apply wins.
    """
    tp = spec.layout.tensor_parallel_size
    raw = selected_members(status, pods, None)
    members = effective_members(raw, live)
    ready = [m for m in members if m.get("state") == "Ready"]
    rk = ranks(tp, ready)
    consistent = rk.consistent
    stale = stale_pods(members)
    flagged = set(rk.mismatched) | set(rk.unranked)
    mismatched = sorted({m["pod"] for m in members if m.get("state") == "Mismatched"} | flagged)
    version = rk.version
    label = spec.layout.rank_label

    if not pods:
        ready_c = Cond("Ready", False, "NoReplicas",
                       f"no pods match selector {spec.selector.to_label_selector()}")
    elif not consistent:
        ready_c = Cond("Ready", False, "NoReadyReplicas",
                       f"{len(pods)} pod(s) selected, none has reported Ready weights")
    elif version is None and tp > 1:
        ready_c = Cond("Ready", False, "RanksIncomplete",
                       f"no version is served by every tensor-parallel rank (TP {tp}): ranks "
                       f"{', '.join(map(str, rk.missing))} have no consistent Ready replica on it")
    elif tp == 1:
        ready_c = Cond("Ready", True, "ReplicasReady",
                       f"{len(consistent)}/{len(pods)} replicas serve version {version or '?'}")
    else:
        ready_c = Cond("Ready", True, "ReplicasReady",
                       f"{len(consistent)}/{len(pods)} replicas ready, every rank 0..{tp - 1} "
                       f"serves version {version}")
    if rk.unranked:
        degraded = Cond("Degraded", True, "RankInvalid",
                        f"replicas without a tensor-parallel rank in 0..{tp - 1} are not served: "
                        f"{', '.join(sorted(rk.unranked)[:5])}; label each pod {label}=<rank> "
                        "(its agent reads FERRY_TP_RANK) or fix spec.layout.tensorParallelSize")
    elif mismatched:
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
    overrides += [{"pod": m["pod"], "state": "Mismatched"} for m in ready if m["pod"] in flagged]
    out: dict[str, Any] = {
        "observedGeneration": generation,
        "conditions": set_conditions(status.get("conditions"), [ready_c, degraded], generation, now),
        "replicas": len(pods),
        "readyReplicas": len(consistent),
        "readySummary": f"{len(consistent)}/{len(pods)}",
    }
    if overrides:
        out["members"] = overrides
    if version:
        out["version"] = version
    if rk.fingerprint:
        out["fingerprint"] = rk.fingerprint
    # Size of one full copy: one replica (TP 1), or one replica of each rank (TP > 1).
    serving = rk.serving(version) if version else {}
    refs = [ms[0] for _, ms in sorted(serving.items()) if ms] or consistent[:1]
    if refs and refs[0].get("tensors") is not None:
        out["tensors"] = refs[0]["tensors"]
    if refs and all(m.get("bytes") is not None for m in refs):
        out["bytes"] = sum(m["bytes"] for m in refs)
        out["size"] = human_bytes(out["bytes"])
    return out
