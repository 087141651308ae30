"""ArtifactCache: choose a warm source, count installs, list failures compactly.

Each agent writes only its own entry in `status.members`: sources say which
caches they packed, targets whether they installed them. The operator picks
one source whose packed caches cover every kind asked for, keeps it while it
stays live (so targets are not sent elsewhere mid-install), and aggregates.

compute_status reads the status as its API model and returns the operator's part
of it as the same model (`.wire()` only when it is applied); `members` stay the
agents' own and are left out.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from ferry_api.artifactcache import (
    ArtifactCache,
    ArtifactCacheSpec,
    ArtifactCacheStatus,
    CacheMember,
    CacheRef,
    InstallFailure,
    combined_manifest_id,
)

from ..conditions import Cond, condition_models

KIND, PLURAL = ArtifactCache.KIND, ArtifactCache.PLURAL
MAX_FAILURES = 20


def _covers(member: CacheMember, kinds: Sequence[str]) -> bool:
    return member.state == "Packed" and set(kinds) <= {c.kind for c in member.caches or []}


def trust_mode(spec: ArtifactCacheSpec) -> str:
    """Signed | Unverified (unsigned caches allowed) | Refused (no spec.trust)."""
    if spec.trust is None:
        return "Refused"
    return "Signed" if spec.trust.secret_ref else "Unverified"


def choose_source(
    spec: ArtifactCacheSpec,
    members: dict[str, CacheMember],
    current: str | None,
    sources: list[str],
    live: set[str] | None,
) -> str | None:
    """The source pod targets install from: the current one while it still covers every
    kind and is live, else the first (by name) that does."""
    usable = sorted(
        p
        for p in sources
        if p in members and _covers(members[p], spec.kinds) and (live is None or p in live)
    )
    return current if current in usable else (usable[0] if usable else None)


def _ready(
    spec: ArtifactCacheSpec,
    members: dict[str, CacheMember],
    sources: list[str],
    source: str | None,
    manifest_id: str,
    installed: int,
    targets: int,
) -> Cond:
    if source is not None:
        return Cond(
            "Ready",
            True,
            "CacheAvailable",
            f"{source} serves {manifest_id[:23]}; {installed}/{targets} targets installed",
        )
    if not sources:
        return Cond(
            "Ready",
            False,
            "NoSource",
            f"no pods match spec.sources ({spec.sources.to_label_selector()})",
        )
    reasons = sorted(
        {members[p].reason or "NotReported" for p in sources if p in members}
        | ({"NotReported"} if any(p not in members for p in sources) else set())
    )
    return Cond(
        "Ready",
        False,
        "NoMatchingCache",
        f"{len(sources)} source pod(s), none has packed {', '.join(spec.kinds)} for this identity "
        f"({', '.join(reasons)})",
    )


def _degraded(failed: list[CacheMember]) -> Cond:
    if not failed:
        return Cond("Degraded", False, "AsExpected", "")
    return Cond(
        "Degraded",
        True,
        "InstallFailures",
        f"{len(failed)} target(s) gave up and start cold: "
        + "; ".join(f"{m.pod}: {m.reason}" for m in failed[:5]),
    )


TRUSTED = {
    "Signed": Cond("Trusted", True, "Signed", "targets verify an ed25519 signature"),
    "Unverified": Cond(
        "Trusted",
        False,
        "UnsignedAllowed",
        "spec.trust.allowUnsigned: targets install unsigned caches from any source pod",
    ),
    "Refused": Cond(
        "Trusted",
        False,
        "UnsignedRefused",
        "spec.trust is not set: targets refuse caches; set spec.trust.secretRef "
        "(signed caches) or spec.trust.allowUnsigned: true",
    ),
}


def read_status(status: dict[str, Any]) -> ArtifactCacheStatus:
    """The status as its model, each agent's entry read leniently: a newer agent's
    unknown field is left out, and so is a value that cannot be read (an entry without
    its state is not counted), so one bad entry does not fail the whole status."""
    return ArtifactCacheStatus.lenient(status).model or ArtifactCacheStatus()


def compute_status(
    spec: ArtifactCacheSpec,
    status: ArtifactCacheStatus | dict[str, Any],
    generation: int,
    sources: list[str],
    targets: list[str],
    now: datetime,
    live: set[str] | None = None,
) -> ArtifactCacheStatus:
    st = status if isinstance(status, ArtifactCacheStatus) else read_status(status)
    members = {m.pod: m for m in st.members or []}
    source = choose_source(spec, members, st.source, sources, live)
    caches: list[CacheRef] = []
    if source is not None:
        caches = [c for c in members[source].caches or [] if c.kind in spec.kinds]
    manifest_id = combined_manifest_id(caches) if caches else ""
    entries = [members[p] for p in targets if p in members and members[p].role == "target"]
    installed = [
        m
        for m in entries
        if m.state == "Installed" and m.caches and combined_manifest_id(m.caches) == manifest_id
    ]
    failed = sorted((m for m in entries if m.state == "Failed"), key=lambda m: m.pod)
    mode = trust_mode(spec)
    wanted = [
        _ready(spec, members, sources, source, manifest_id, len(installed), len(targets)),
        _degraded(failed),
        TRUSTED[mode],
    ]
    return ArtifactCacheStatus(
        observed_generation=generation,
        trust=mode,  # type: ignore[arg-type]
        targets=len(targets),
        installed=len(installed),
        source=source,
        caches=caches or None,
        manifest_id=manifest_id or None,
        bytes=sum(c.bytes or 0 for c in caches) if caches else None,
        files=sum(c.files or 0 for c in caches) if caches else None,
        failures=[
            InstallFailure(
                pod=m.pod,
                reason=m.reason or "InstallFailed",
                message=m.message[:200] if m.message else None,
            )
            for m in failed[:MAX_FAILURES]
        ]
        or None,
        conditions=condition_models(st.conditions, wanted, generation, now),
    )
