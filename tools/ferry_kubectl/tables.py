"""`kubectl ferry status`: one compact table per kind, from the objects' status."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any, TypeAlias

from ferry_api.artifactcache import ArtifactCache, ArtifactCacheSpec, ArtifactCacheStatus
from ferry_api.objects import Object, condition, is_true, read
from ferry_api.refitjob import RefitJob, RefitJobSpec, RefitJobStatus
from ferry_api.weightsource import WeightSource, WeightSourceSpec, WeightSourceStatus

from .units import fmt_age, fmt_bytes

Source: TypeAlias = Object[WeightSourceSpec, WeightSourceStatus]
Job: TypeAlias = Object[RefitJobSpec, RefitJobStatus]
Cache: TypeAlias = Object[ArtifactCacheSpec, ArtifactCacheStatus]


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    """kubectl-style columns: left-aligned, three spaces apart, no trailing blanks."""
    widths = [max(len(str(r[i])) for r in [headers, *rows]) for i in range(len(headers))]
    return [
        "   ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
        for r in [headers, *rows]
    ]


def _few(names: Sequence[str], most: int = 2) -> str:
    if not names:
        return "-"
    shown = ",".join(names[:most])
    return shown + (f",+{len(names) - most}" if len(names) > most else "")


def source_row(obj: Source, now: datetime) -> list[str]:
    st = obj.status
    ready = st.ready_summary or f"{st.ready_replicas or 0}/{st.replicas or 0}"
    size = st.size or (fmt_bytes(st.bytes, sep="") if st.bytes else "-")
    stale = [m.pod for m in st.members or [] if m.state in ("Stale", "Mismatched")]
    degraded, ready_c = condition(st.conditions, "Degraded"), condition(st.conditions, "Ready")
    if degraded is not None and degraded.status == "True":
        state = f"Degraded:{degraded.reason}"
    elif ready_c is not None and ready_c.status == "True":
        state = "Ready"
    else:
        state = ready_c.reason if ready_c else "Pending"
    return [
        obj.name,
        obj.spec.model.name,
        st.version or "-",
        ready,
        size,
        _few(sorted(stale)),
        state,
        fmt_age(obj.meta.creation_timestamp, now),
    ]


def job_reason(obj: Job) -> str:
    """Why a job failed, is stuck, or is retrying; '' when all is well."""
    st = obj.status
    if st.phase == "Failed" or is_true(st.conditions, "Failed"):
        failed = condition(st.conditions, "Failed")
        return failed.reason if failed else "Failed"
    progressing = condition(st.conditions, "Progressing")
    if progressing and progressing.status == "False" and progressing.reason != "Finished":
        return progressing.reason
    retrying = sorted({t.reason for t in st.targets or [] if t.reason and t.phase != "Done"})
    return f"Retrying:{','.join(retrying)}" if retrying else ""


def job_progress(st: RefitJobStatus) -> str:
    if not st.bytes_total:
        return "-"
    return f"{min(100, int(100 * (st.bytes_done or 0) / st.bytes_total))}%"


def job_row(obj: Job, now: datetime) -> list[str]:
    st = obj.status
    return [
        obj.name,
        obj.spec.source_ref.name,
        st.version or obj.spec.version,
        st.phase or "Pending",
        st.targets_summary or "-",
        job_progress(st),
        st.throughput or "-",
        fmt_age(obj.meta.creation_timestamp, now),
        job_reason(obj) or "-",
    ]


def cache_row(obj: Cache, now: datetime) -> list[str]:
    st = obj.status
    manifest = (st.manifest_id or "-").removeprefix("sha256:")[:12]
    return [
        obj.name,
        ",".join(obj.spec.kinds) or "-",
        manifest,
        fmt_bytes(st.bytes, sep="") if st.bytes else "-",
        f"{st.installed or 0}/{st.targets or 0}",
        st.trust or "-",
        _few(sorted(f.pod for f in st.failures or [])),
        fmt_age(obj.meta.creation_timestamp, now),
    ]


KINDS = (
    (
        WeightSource,
        "WeightSources",
        ["NAME", "MODEL", "VERSION", "READY", "SIZE", "STALE", "STATE", "AGE"],
        source_row,
    ),
    (
        RefitJob,
        "RefitJobs",
        [
            "NAME",
            "SOURCE",
            "VERSION",
            "PHASE",
            "TARGETS",
            "PROGRESS",
            "THROUGHPUT",
            "AGE",
            "REASON",
        ],
        job_row,
    ),
    (
        ArtifactCache,
        "ArtifactCaches",
        ["NAME", "KINDS", "MANIFEST", "SIZE", "INSTALLED", "TRUST", "FAILURES", "AGE"],
        cache_row,
    ),
)


def status_lines(
    objects: dict[str, list[dict[str, Any]]], now: datetime, namespace: str | None
) -> list[str]:
    """All three tables from the objects as listed (plural -> items), each read through its
    API model; `namespace` None means every namespace (adds a NAMESPACE column)."""
    out: list[str] = []
    for kind, title, headers, row in KINDS:
        items = sorted(
            (read(kind, o) for o in objects.get(kind.PLURAL) or []),
            key=lambda o: (o.meta.namespace, o.meta.name),
        )
        if out:
            out.append("")
        if not items:
            where = "any namespace" if namespace is None else f"namespace {namespace}"
            out.append(f"No {title} in {where}.")
            continue
        out.append(f"{title.upper()}")
        rows = [row(o, now) for o in items]
        if namespace is None:
            headers = ["NAMESPACE", *headers]
            rows = [[o.meta.namespace, *r] for o, r in zip(items, rows, strict=True)]
        out.extend(table(headers, rows))
    return out
