"""WeightSource: aggregate the replicas' own entries into Ready / Degraded.

With `spec.layout.tensorParallelSize` S > 1 every replica holds one rank's shard
(its agent reports `rank`, read from FERRY_TP_RANK). Fingerprints are compared per
rank (the majority of each rank wins), and the source is Ready only when every
rank 0..S-1 has a consistent Ready replica on one common version. A Ready replica
without a rank, or with a rank >= S, is not served and is flagged Mismatched.

With `spec.layout.ranksPerPod` k > 1 a pod holds k consecutive ranks (ferry_api.ranks):
everything above runs over pod ranks 0..S/k-1 (the rank label), each pod's entry
reporting one fingerprint and digest combined over its local ranks, its tensors and
bytes summed, and `ranks` listing only the local ranks that differ from it. A pod
whose agent serves another number of local ranks is not served (Mismatched); a pod
one of whose ranks failed (state Failed) is not Ready, and Degraded names the rank.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from ferry_api.meta import Condition
from ferry_api.ranks import combined
from ferry_api.weightsource import (
    RankStatus,
    ReplicaStatus,
    WeightSource,
    WeightSourceSpec,
    WeightSourceStatus,
)

from ..conditions import Cond, condition_models, human_bytes

KIND, PLURAL = WeightSource.KIND, WeightSource.PLURAL


def read_member(entry: Any) -> ReplicaStatus | None:
    """An agent's entry as its model. Unknown fields (a newer agent's) are left out; an
    entry with a value that cannot be read is kept with that value left out and no
    state, so it is not served (None: not even its pod can be read)."""
    got = ReplicaStatus.lenient(entry)
    member: ReplicaStatus | None = got.model
    if member is not None and got.bad:
        member = member.model_copy(update={"state": None})
    return member


def read_members(status: WeightSourceStatus | dict[str, Any] | None) -> list[ReplicaStatus]:
    """status.members as models (read_member), whether the status is its model or wire form."""
    if isinstance(status, WeightSourceStatus):
        return list(status.members or [])
    entries = (status or {}).get("members")
    found = (read_member(e) for e in (entries if isinstance(entries, list) else []))
    return [m for m in found if m is not None]


def _read_conditions(status: WeightSourceStatus | dict[str, Any] | None) -> list[Condition]:
    if isinstance(status, WeightSourceStatus):
        return list(status.conditions or [])
    entries = (status or {}).get("conditions")
    found = (Condition.lenient(c).model for c in (entries if isinstance(entries, list) else []))
    return [c for c in found if c is not None]


def effective_members(
    members: Sequence[ReplicaStatus], live: set[str] | None
) -> list[ReplicaStatus]:
    """Agents' entries with Stale applied where the agent's Lease expired or is gone."""
    if live is None:
        return list(members)
    return [
        m if m.pod in live or m.state == "Stale" else m.model_copy(update={"state": "Stale"})
        for m in members
    ]


def selected_members(
    status: WeightSourceStatus | dict[str, Any] | None, pods: list[str], live: set[str] | None
) -> list[ReplicaStatus]:
    """The entries of the selected pods, with Stale applied (see effective_members)."""
    selected = set(pods)
    return effective_members([m for m in read_members(status) if m.pod in selected], live)


def stale_pods(members: Sequence[ReplicaStatus]) -> list[str]:
    return [m.pod for m in members if m.state == "Stale"]


def tp_fingerprint(per_rank: dict[int, str]) -> str:
    """status.fingerprint of a TP > 1 source: `tp<S>:` and the sha256 (hex) of the
    lines `<rank>=<fingerprint>` for (pod) ranks 0..S-1, joined by newlines. Stable: it
    changes only when some rank's layout changes (ferry_api.ranks.combined)."""
    return combined(per_rank)


@dataclass
class Ranks:
    """Ready replicas seen per tensor-parallel rank (`tp` = spec.layout.tensorParallelSize)."""

    tp: int
    consistent: list[ReplicaStatus] = field(default_factory=list)  # rank's majority fingerprint
    mismatched: list[str] = field(default_factory=list)  # another fingerprint than their rank's
    unranked: list[str] = field(default_factory=list)  # no rank, or rank >= tp (tp > 1 only)
    fingerprints: dict[int, str] = field(default_factory=dict)  # rank -> majority fingerprint
    version: str | None = None  # served: every rank has a consistent replica on it
    missing: list[int] = field(
        default_factory=list
    )  # ranks without a consistent replica on `version`

    @property
    def fingerprint(self) -> str | None:
        if self.tp == 1:
            return self.fingerprints.get(0)
        return tp_fingerprint(self.fingerprints) if len(self.fingerprints) == self.tp else None

    def rank_of(self, member: ReplicaStatus) -> int:
        return 0 if self.tp == 1 else int(member.rank or 0)

    def serving(self, version: str | None) -> dict[int, list[ReplicaStatus]]:
        """Consistent replicas on `version` (None: any), by rank."""
        out: dict[int, list[ReplicaStatus]] = {r: [] for r in range(self.tp)}
        for m in self.consistent:
            if version is None or m.version == version:
                out[self.rank_of(m)].append(m)
        return out


def ranks(tp: int, ready: Sequence[ReplicaStatus]) -> Ranks:
    """Per-rank majority fingerprints and the version every rank serves (pure).

    With tp == 1 ranks are ignored: one majority fingerprint, the most common
    version among the consistent replicas."""
    out = Ranks(tp)
    by_rank: dict[int, list[ReplicaStatus]] = {}
    for m in ready:
        rank = m.rank
        if tp > 1 and (rank is None or not 0 <= rank < tp):
            out.unranked.append(m.pod)
            continue
        by_rank.setdefault(0 if tp == 1 or rank is None else rank, []).append(m)
    for r, members in sorted(by_rank.items()):
        fps = Counter(m.fingerprint for m in members if m.fingerprint)
        if not fps:
            continue
        major = fps.most_common(1)[0][0]
        out.fingerprints[r] = major
        for m in members:
            if m.fingerprint == major:
                out.consistent.append(m)
            else:
                out.mismatched.append(m.pod)
    versions = Counter(m.version for m in out.consistent if m.version)
    if tp == 1:
        out.version = versions.most_common(1)[0][0] if versions else None
        return out
    # The version with a consistent replica on every rank; among several (a rolling
    # update), the one most replicas serve, then the name.
    covered = {v: {out.rank_of(m) for m in out.consistent if m.version == v} for v in versions}
    full = sorted(
        (v for v, rs in covered.items() if len(rs) == tp), key=lambda v: (-versions[v], v)
    )
    if full:
        out.version = full[0]
    else:
        best = max(covered, key=lambda v: (len(covered[v]), versions[v]), default=None)
        have = covered.get(best, set()) if best else set()
        out.missing = [r for r in range(tp) if r not in have]
    return out


def status_model(
    spec: WeightSourceSpec,
    status: WeightSourceStatus | dict[str, Any] | None,
    generation: int,
    pods: list[str],
    now: datetime,
    live: set[str] | None = None,
) -> WeightSourceStatus:
    """Operator-owned status fields from the selected pods, the agents' entries and their
    Leases, as the status model (`.wire()` only when it is applied).

    `members` entries belong to the agents (one SSA field manager each), read as
    ReplicaStatus (read_member: one unreadable entry does not fail the status). The
    operator only overrides `state` of an entry, to Stale when the agent's Lease
    (`live`: pods with a fresh Lease) expired, or to Mismatched when its layout
    differs from the others of its rank (or it has no valid rank); once the agent
    is fresh again its own apply wins.
    """
    k = spec.layout.ranks_per_pod
    raw = selected_members(status, pods, None)
    members = effective_members(raw, live)
    ready = [m for m in members if m.state == "Ready"]
    # A pod that holds another number of local ranks serves no rank of this layout.
    wrong_k = sorted(m.pod for m in ready if (m.local_ranks or 1) != k)
    rk = ranks(pod_ranks(spec), [m for m in ready if m.pod not in wrong_k])
    consistent = rk.consistent
    stale = stale_pods(members)
    flagged = set(rk.mismatched) | set(rk.unranked) | set(wrong_k)
    mismatched = sorted({m.pod for m in members if m.state == "Mismatched"} | flagged)
    version = rk.version
    ready_c = _ready(spec, pods, rk)
    degraded = _degraded(spec, pods, rk, stale, mismatched, wrong_k, failed_ranks(members))

    overrides = [
        ReplicaStatus(pod=m.pod, state="Stale")
        for m, r in zip(members, raw, strict=True)
        if m.state == "Stale" and r.state != "Stale"
    ]
    overrides += [ReplicaStatus(pod=m.pod, state="Mismatched") for m in ready if m.pod in flagged]
    # Size of one full copy: one replica (TP 1), or one replica of each rank (TP > 1).
    serving = rk.serving(version) if version else {}
    refs = [ms[0] for _, ms in sorted(serving.items()) if ms] or consistent[:1]
    # Content digest: the one replica's (TP 1), or combined over the ranks like the
    # fingerprint; only when every rank's replica reports one for the served version.
    digest = None
    if version and refs and all(m.digest for m in refs):
        digest = (
            refs[0].digest
            if len(refs) == 1
            else tp_fingerprint({rk.rank_of(m): str(m.digest) for m in refs})
        )
    size = (
        sum(m.bytes or 0 for m in refs) if refs and all(m.bytes is not None for m in refs) else None
    )
    return WeightSourceStatus(
        observed_generation=generation,
        conditions=condition_models(_read_conditions(status), [ready_c, degraded], generation, now),
        replicas=len(pods),
        ready_replicas=len(consistent),
        ready_summary=f"{len(consistent)}/{len(pods)}",
        members=overrides or None,
        version=version or None,
        fingerprint=rk.fingerprint or None,
        tensors=refs[0].tensors if refs else None,
        digest=digest,
        bytes=size,
        size=human_bytes(size),
    )


def compute_status(
    spec: WeightSourceSpec,
    status: WeightSourceStatus | dict[str, Any] | None,
    generation: int,
    pods: list[str],
    now: datetime,
    live: set[str] | None = None,
) -> dict[str, Any]:
    """status_model in wire form (what is applied)."""
    return status_model(spec, status, generation, pods, now, live).wire()


def pod_ranks(spec: WeightSourceSpec) -> int:
    """Pod ranks (values of the rank label): tensorParallelSize / ranksPerPod."""
    return max(1, spec.layout.tensor_parallel_size // spec.layout.ranks_per_pod)


def failed_ranks(members: Sequence[ReplicaStatus]) -> list[str]:
    """`pod local rank l (rank g): Reason: message` for each failed local rank the
    pods' entries list (ReplicaStatus.ranks), or the pod's own reason when it failed
    as a whole."""
    out: list[str] = []
    for entry in members:
        if entry.state != "Failed":
            continue
        bad = [r for r in entry.ranks or [] if r.state == "Failed"] or [
            RankStatus(local_rank=0, reason=entry.reason)
        ]
        for r in bad:
            where = f"local rank {r.local_rank}" + (
                f" (rank {r.rank})" if r.rank is not None else ""
            )
            out.append(
                f"{entry.pod} {where}: {r.reason or 'Failed'}"
                + (f": {r.message}" if r.message else "")
            )
    return out


def _ready(spec: WeightSourceSpec, pods: list[str], rk: Ranks) -> Cond:
    """Ready: a version every rank serves from a consistent replica."""
    tp, consistent, version = pod_ranks(spec), rk.consistent, rk.version
    if not pods:
        return Cond(
            "Ready",
            False,
            "NoReplicas",
            f"no pods match selector {spec.selector.to_label_selector()}",
        )
    if not consistent:
        return Cond(
            "Ready",
            False,
            "NoReadyReplicas",
            f"{len(pods)} pod(s) selected, none has reported Ready weights",
        )
    what = (
        "tensor-parallel rank"
        if spec.layout.ranks_per_pod == 1
        else f"pod rank (of {spec.layout.ranks_per_pod} ranks each)"
    )
    if version is None and tp > 1:
        return Cond(
            "Ready",
            False,
            "RanksIncomplete",
            f"no version is served by every {what} (TP {spec.layout.tensor_parallel_size}): "
            f"pod ranks {', '.join(map(str, rk.missing))} have no consistent Ready replica on it",
        )
    if tp == 1:
        return Cond(
            "Ready",
            True,
            "ReplicasReady",
            f"{len(consistent)}/{len(pods)} replicas serve version {version or '?'}",
        )
    return Cond(
        "Ready",
        True,
        "ReplicasReady",
        f"{len(consistent)}/{len(pods)} replicas ready, every {what} 0..{tp - 1} "
        f"serves version {version}",
    )


def _degraded(
    spec: WeightSourceSpec,
    pods: list[str],
    rk: Ranks,
    stale: list[str],
    mismatched: list[str],
    wrong_k: list[str] | None = None,
    failed: list[str] | None = None,
) -> Cond:
    """Degraded: the worst of invalid ranks, failed local ranks, local ranks other than
    spec.layout.ranksPerPod, layout mismatches, stale and loading replicas."""
    tp, consistent, label = pod_ranks(spec), rk.consistent, spec.layout.rank_label
    if rk.unranked:
        what = "tensor-parallel rank" if spec.layout.ranks_per_pod == 1 else "pod rank"
        return Cond(
            "Degraded",
            True,
            "RankInvalid",
            f"replicas without a {what} in 0..{tp - 1} are not served: "
            f"{', '.join(sorted(rk.unranked)[:5])}; label each pod {label}=<rank> "
            "(its agent reads FERRY_TP_RANK) or fix spec.layout.tensorParallelSize "
            "(and spec.layout.ranksPerPod)",
        )
    if failed:
        return Cond(
            "Degraded",
            True,
            "RankFailed",
            f"replicas with a failed local rank are not Ready: {'; '.join(failed[:5])}",
        )
    if wrong_k:
        return Cond(
            "Degraded",
            True,
            "RanksPerPodMismatch",
            f"replicas whose agent serves another number of local ranks than "
            f"spec.layout.ranksPerPod={spec.layout.ranks_per_pod} are not served: "
            f"{', '.join(wrong_k[:5])}; run their agents with --devices (or --ranks) for "
            f"{spec.layout.ranks_per_pod} GPUs, or fix spec.layout.ranksPerPod",
        )
    if mismatched:
        return Cond(
            "Degraded",
            True,
            "FingerprintMismatch",
            f"replicas with a different layout are not served: {', '.join(mismatched[:5])}",
        )
    if stale:
        return Cond(
            "Degraded",
            True,
            "ReplicasStale",
            f"replicas whose lease expired or that shut down: {', '.join(sorted(stale)[:5])}",
        )
    if pods and len(consistent) < len(pods):
        return Cond(
            "Degraded",
            True,
            "ReplicasNotReady",
            f"{len(pods) - len(consistent)} of {len(pods)} replicas not Ready",
        )
    return Cond("Degraded", False, "AsExpected", "")
