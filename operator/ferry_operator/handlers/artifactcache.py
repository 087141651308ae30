"""ArtifactCache: report trust mode and whether a source exists yet."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from ferry_api.artifactcache import ArtifactCache, ArtifactCacheSpec

from ..conditions import Cond, set_conditions

KIND, PLURAL = ArtifactCache.KIND, ArtifactCache.PLURAL


def compute_status(spec: ArtifactCacheSpec, status: dict[str, Any], generation: int,
                   sources: list[str], targets: list[str], now: datetime) -> dict[str, Any]:
    out: dict[str, Any] = {
        "observedGeneration": generation,
        "trust": "Signed" if spec.trust else "Unverified",
        "targets": len(targets),
        "installed": status.get("installed") or 0,
    }
    if not sources:
        ready = Cond("Ready", False, "NoSource",
                     f"no pods match spec.sources ({spec.sources.to_label_selector()})")
    elif not status.get("manifestId"):
        ready = Cond("Ready", False, "NoMatchingCache",
                     f"{len(sources)} source pod(s), none has packed a cache with this identity yet")
    else:
        ready = Cond("Ready", True, "CacheAvailable", f"manifest {status['manifestId'][:19]}")
    trust_msg = ("targets verify an ed25519 signature" if spec.trust else
                 "spec.trust is not set: targets trust their peers and install unsigned caches")
    wanted = [ready, Cond("Degraded", False, "AsExpected", ""),
              Cond("Trusted", bool(spec.trust), "Signed" if spec.trust else "PeersTrusted", trust_msg)]
    out["conditions"] = set_conditions(status.get("conditions"), wanted, generation, now)
    return out
