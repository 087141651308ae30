"""ArtifactCache: choose a warm source, count installs, list failures compactly.

Each agent writes only its own entry in `status.members`: sources say which
caches they packed, targets whether they installed them. The operator picks
one source whose packed caches cover every kind asked for, keeps it while it
stays live (so targets are not sent elsewhere mid-install), and aggregates.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from ferry_api.artifactcache import ArtifactCache, ArtifactCacheSpec, combined_manifest_id

from ..conditions import Cond, set_conditions

KIND, PLURAL = ArtifactCache.KIND, ArtifactCache.PLURAL
MAX_FAILURES = 20


def _covers(entry: dict[str, Any], kinds: Sequence[str]) -> bool:
    have = {c.get("kind") for c in entry.get("caches") or []}
    return entry.get("state") == "Packed" and set(kinds) <= have


def compute_status(spec: ArtifactCacheSpec, status: dict[str, Any], generation: int,
                   sources: list[str], targets: list[str], now: datetime,
                   live: set[str] | None = None) -> dict[str, Any]:
    members = {m["pod"]: m for m in status.get("members") or [] if m.get("pod")}
    usable = sorted(p for p in sources if p in members and _covers(members[p], spec.kinds)
                    and (live is None or p in live))
    current = status.get("source")
    source = current if current in usable else (usable[0] if usable else None)
    out: dict[str, Any] = {
        "observedGeneration": generation,
        "trust": "Signed" if spec.trust else "Unverified",
        "targets": len(targets),
    }
    manifest_id = ""
    if source is not None:
        caches = [c for c in members[source]["caches"] if c.get("kind") in spec.kinds]
        manifest_id = combined_manifest_id(caches)
        out.update(source=source, caches=caches, manifestId=manifest_id,
                   bytes=sum(c.get("bytes") or 0 for c in caches),
                   files=sum(c.get("files") or 0 for c in caches))
    target_entries = [members[p] for p in targets if p in members and members[p].get("role") == "target"]
    installed = [e for e in target_entries if e.get("state") == "Installed"
                 and e.get("caches") and combined_manifest_id(e["caches"]) == manifest_id]
    failed = sorted((e for e in target_entries if e.get("state") == "Failed"), key=lambda e: e["pod"])
    out["installed"] = len(installed)
    if failed:
        out["failures"] = [{"pod": e["pod"], "reason": e.get("reason") or "InstallFailed",
                            **({"message": e["message"][:200]} if e.get("message") else {})}
                           for e in failed[:MAX_FAILURES]]

    if source is not None:
        ready = Cond("Ready", True, "CacheAvailable",
                     f"{source} serves {manifest_id[:23]}; {len(installed)}/{len(targets)} targets installed")
    elif not sources:
        ready = Cond("Ready", False, "NoSource",
                     f"no pods match spec.sources ({spec.sources.to_label_selector()})")
    else:
        reasons = sorted({members[p].get("reason") or "NotReported" for p in sources if p in members}
                         | ({"NotReported"} if any(p not in members for p in sources) else set()))
        ready = Cond("Ready", False, "NoMatchingCache",
                     f"{len(sources)} source pod(s), none has packed {', '.join(spec.kinds)} for this identity "
                     f"({', '.join(reasons)})")
    if failed:
        degraded = Cond("Degraded", True, "InstallFailures",
                        f"{len(failed)} target(s) gave up and start cold: "
                        + "; ".join(f"{e['pod']}: {e.get('reason')}" for e in failed[:5]))
    else:
        degraded = Cond("Degraded", False, "AsExpected", "")
    trust_msg = ("targets verify an ed25519 signature" if spec.trust else
                 "spec.trust is not set: targets trust their peers and install unsigned caches")
    wanted = [ready, degraded,
              Cond("Trusted", bool(spec.trust), "Signed" if spec.trust else "PeersTrusted", trust_msg)]
    out["conditions"] = set_conditions(status.get("conditions"), wanted, generation, now)
    return out
