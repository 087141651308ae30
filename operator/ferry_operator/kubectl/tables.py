"""`kubectl ferry status`: one compact table per kind, from the objects' status."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from .units import fmt_age, fmt_bytes

Obj = dict[str, Any]


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    """kubectl-style columns: left-aligned, three spaces apart, no trailing blanks."""
    widths = [max(len(str(r[i])) for r in [headers, *rows]) for i in range(len(headers))]
    return [
        "   ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
        for r in [headers, *rows]
    ]


def condition(obj: Obj, type_: str) -> Obj | None:
    return next(
        (c for c in (obj.get("status") or {}).get("conditions") or [] if c.get("type") == type_),
        None,
    )


def _is_true(obj: Obj, type_: str) -> bool:
    return (condition(obj, type_) or {}).get("status") == "True"


def _few(names: Sequence[str], most: int = 2) -> str:
    if not names:
        return "-"
    shown = ",".join(names[:most])
    return shown + (f",+{len(names) - most}" if len(names) > most else "")


def source_row(obj: Obj, now: datetime) -> list[str]:
    spec, st = obj.get("spec") or {}, obj.get("status") or {}
    model = (spec.get("model") or {}).get("name", "-")
    ready = st.get("readySummary") or f"{st.get('readyReplicas', 0)}/{st.get('replicas', 0)}"
    size = st.get("size") or (fmt_bytes(st["bytes"], sep="") if st.get("bytes") else "-")
    stale = [m["pod"] for m in st.get("members") or [] if m.get("state") in ("Stale", "Mismatched")]
    if _is_true(obj, "Degraded"):
        state = f"Degraded:{condition(obj, 'Degraded')['reason']}"  # type: ignore[index]
    elif _is_true(obj, "Ready"):
        state = "Ready"
    else:
        state = (condition(obj, "Ready") or {}).get("reason", "Pending")
    return [
        obj["metadata"]["name"],
        model,
        st.get("version") or "-",
        ready,
        size,
        _few(sorted(stale)),
        state,
        fmt_age(obj["metadata"].get("creationTimestamp"), now),
    ]


def job_reason(obj: Obj) -> str:
    """Why a job failed, is stuck, or is retrying; '' when all is well."""
    st = obj.get("status") or {}
    if st.get("phase") == "Failed" or _is_true(obj, "Failed"):
        return (condition(obj, "Failed") or {}).get("reason", "Failed")
    progressing = condition(obj, "Progressing")
    if (
        progressing
        and progressing.get("status") == "False"
        and progressing.get("reason") != "Finished"
    ):
        return progressing.get("reason", "")
    retrying = sorted(
        {
            t["reason"]
            for t in st.get("targets") or []
            if t.get("reason") and t.get("phase") != "Done"
        }
    )
    return f"Retrying:{','.join(retrying)}" if retrying else ""


def job_progress(st: Obj) -> str:
    total, done = st.get("bytesTotal"), st.get("bytesDone") or 0
    if not total:
        return "-"
    return f"{min(100, int(100 * done / total))}%"


def job_row(obj: Obj, now: datetime) -> list[str]:
    spec, st = obj.get("spec") or {}, obj.get("status") or {}
    return [
        obj["metadata"]["name"],
        (spec.get("sourceRef") or {}).get("name", "-"),
        st.get("version") or spec.get("version") or "-",
        st.get("phase") or "Pending",
        st.get("targetsSummary") or "-",
        job_progress(st),
        st.get("throughput") or "-",
        fmt_age(obj["metadata"].get("creationTimestamp"), now),
        job_reason(obj) or "-",
    ]


def cache_row(obj: Obj, now: datetime) -> list[str]:
    spec, st = obj.get("spec") or {}, obj.get("status") or {}
    manifest = (st.get("manifestId") or "-").removeprefix("sha256:")[:12]
    installed = f"{st.get('installed', 0)}/{st.get('targets', 0)}"
    failures = [f["pod"] for f in st.get("failures") or []]
    return [
        obj["metadata"]["name"],
        ",".join(spec.get("kinds") or []) or "-",
        manifest,
        fmt_bytes(st["bytes"], sep="") if st.get("bytes") else "-",
        installed,
        st.get("trust") or "-",
        _few(sorted(failures)),
        fmt_age(obj["metadata"].get("creationTimestamp"), now),
    ]


KINDS = (
    (
        "weightsources",
        "WeightSources",
        ["NAME", "MODEL", "VERSION", "READY", "SIZE", "STALE", "STATE", "AGE"],
        source_row,
    ),
    (
        "refitjobs",
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
        "artifactcaches",
        "ArtifactCaches",
        ["NAME", "KINDS", "MANIFEST", "SIZE", "INSTALLED", "TRUST", "FAILURES", "AGE"],
        cache_row,
    ),
)


def status_lines(objects: dict[str, list[Obj]], now: datetime, namespace: str | None) -> list[str]:
    """All three tables; `namespace` None means every namespace (adds a NAMESPACE column)."""
    out: list[str] = []
    for plural, title, headers, row in KINDS:
        items = sorted(
            objects.get(plural) or [],
            key=lambda o: (o["metadata"].get("namespace", ""), o["metadata"]["name"]),
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
            rows = [
                [o["metadata"].get("namespace", ""), *r] for o, r in zip(items, rows, strict=True)
            ]
        out.extend(table(headers, rows))
    return out
