"""Live RefitJob progress: per-target rates from successive observations, ETA,
and the lines a terminal (redrawn in place) or a log (plain lines) shows."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from datetime import datetime

from ferry_api.objects import condition

from .tables import Job
from .units import fmt_bytes, fmt_duration, fmt_rate

# Agents write their progress about once a second; a 5 s window smooths the
# steps between writes without hiding a stall for long.
RATE_WINDOW_S = 5.0
JOB = "\0job"  # key for the whole job's bytes in Rates


@dataclass
class Rates:
    """Bytes per second per key (a target pod, or JOB) over a sliding window of observations."""

    window_s: float = RATE_WINDOW_S
    _seen: dict[str, deque[tuple[float, int]]] = field(default_factory=dict)

    def observe(self, key: str, t: float, nbytes: int) -> None:
        hist = self._seen.setdefault(key, deque())
        if hist and nbytes < hist[-1][1]:
            hist.clear()  # a retry starts again from zero
        hist.append((t, nbytes))
        # Keep one sample at or before the window's start so the span covers the whole window.
        while len(hist) > 2 and hist[1][0] <= t - self.window_s:
            hist.popleft()

    def rate(self, key: str) -> float | None:
        hist = self._seen.get(key)
        if not hist or len(hist) < 2:
            return None
        (t0, b0), (t1, b1) = hist[0], hist[-1]
        return (b1 - b0) / (t1 - t0) if t1 > t0 else None


@dataclass(frozen=True)
class TargetView:
    pod: str
    phase: str
    source: str
    bytes: int
    total: int | None
    rate: float | None
    eta: float | None
    attempts: int = 0
    reason: str = ""


@dataclass(frozen=True)
class JobView:
    name: str
    source: str
    version: str
    phase: str
    done: int
    count: int
    bytes: int
    total: int | None
    rate: float | None
    eta: float | None
    elapsed: float | None
    targets: tuple[TargetView, ...]
    outcome: str | None  # Complete | Failed | None while running
    reason: str = ""
    message: str = ""


def outcome(obj: Job) -> tuple[str | None, str, str]:
    """(Complete | Failed | None, reason, message) from the job's conditions and phase."""
    st = obj.status
    for type_ in ("Complete", "Failed"):
        c = condition(st.conditions, type_)
        if c and c.status == "True":
            return type_, c.reason, c.message
    if st.phase == "Succeeded":
        return "Complete", "", ""
    if st.phase == "Failed":
        c = condition(st.conditions, "Failed")
        return "Failed", c.reason if c else "Failed", c.message if c else ""
    return None, "", ""


def _eta(remaining: int | None, rate: float | None) -> float | None:
    if remaining is None or not rate or rate <= 0:
        return None
    return max(0.0, remaining / rate)


def job_view(obj: Job, rates: Rates, t: float, now: datetime) -> JobView:
    """Fold one observation of the job (taken at monotonic time `t`, wall time `now`)
    into `rates` and describe it."""
    st = obj.status
    entries = sorted(st.targets or [], key=lambda e: e.pod)
    summary = (st.targets_summary or "").partition("/")
    count = int(summary[2]) if summary[2].isdigit() else len(entries)
    done = int(summary[0]) if summary[0].isdigit() else sum(e.phase == "Done" for e in entries)
    total = st.bytes_total or None
    per_target = total // count if total and count else None
    views = []
    moved = 0
    for e in entries:
        nbytes = e.bytes or 0
        if e.phase == "Done" and per_target:
            nbytes = max(nbytes, per_target)
        moved += nbytes
        rates.observe(e.pod, t, nbytes)
        if e.phase == "Done" and e.seconds:
            rate: float | None = nbytes / e.seconds
        elif nbytes:
            rate = rates.rate(e.pod)
        else:
            rate = None  # nothing reported yet: unknown, not zero
        running = e.phase not in ("Done", "Failed")
        views.append(
            TargetView(
                pod=e.pod,
                phase=e.phase or "Assigned",
                source=e.source or "",
                bytes=nbytes,
                total=per_target,
                rate=rate,
                eta=_eta(per_target - nbytes if per_target else None, rate) if running else None,
                attempts=e.attempts or 0,
                reason=e.reason or "",
            )
        )
    rates.observe(JOB, t, moved)
    result, reason, message = outcome(obj)
    start, end = st.start_time, st.completion_time
    elapsed = ((end or now) - start).total_seconds() if start else None
    # The job's rate is its average since startTime (what status.throughput means):
    # targets report in steps, so a windowed rate of their sum would swing.
    job_rate = moved / elapsed if elapsed and elapsed > 0 else rates.rate(JOB)
    return JobView(
        name=obj.name,
        source=obj.spec.source_ref.name,
        version=st.version or obj.spec.version,
        phase=st.phase or "Pending",
        done=done,
        count=count,
        bytes=moved,
        total=total,
        rate=job_rate,
        eta=None if result else _eta(total - moved if total else None, job_rate),
        elapsed=elapsed,
        targets=tuple(views),
        outcome=result,
        reason=reason,
        message=message,
    )


def bar(fraction: float, width: int = 24) -> str:
    fraction = min(1.0, max(0.0, fraction))
    full = int(fraction * width)
    return "[" + "#" * full + ("." * (width - full)) + "]"


def percent(nbytes: int, total: int | None) -> int | None:
    return min(100, int(100 * nbytes / total)) if total else None


def _phase_text(tv: TargetView) -> str:
    text = tv.phase
    if tv.source and tv.phase in ("Assigned", "Pulling"):
        text += f" <- {tv.source}"
    if tv.reason and tv.phase != "Done":
        text += f" ({tv.reason}, attempt {tv.attempts})"
    return text


def target_line(tv: TargetView, pod_width: int, with_bar: bool = True) -> str:
    pct = percent(tv.bytes, tv.total)
    parts = [tv.pod.ljust(pod_width)]
    if with_bar:
        parts.append(bar(tv.bytes / tv.total if tv.total else 0.0))
    parts += [
        f"{pct:>3d}%" if pct is not None else "   -",
        f"{fmt_bytes(tv.bytes)}/{fmt_bytes(tv.total)}".rjust(19),
        fmt_rate(tv.rate).rjust(11),
    ]
    parts.append(
        f"ETA {fmt_duration(tv.eta)}".ljust(10) if tv.phase not in ("Done", "Failed") else " " * 10
    )
    parts.append(_phase_text(tv))
    return "  ".join(parts).rstrip()


def header_line(jv: JobView) -> str:
    pct = percent(jv.bytes, jv.total)
    head = f"refitjob/{jv.name}  {jv.source}@{jv.version or '?'}  {jv.phase}  {jv.done}/{jv.count} targets"
    if jv.total:
        head += f"  {pct}%  {fmt_bytes(jv.bytes)}/{fmt_bytes(jv.total)}"
    head += f"  {fmt_rate(jv.rate)}  elapsed {fmt_duration(jv.elapsed)}"
    if jv.eta is not None:
        head += f"  ETA {fmt_duration(jv.eta)}"
    return head


def frame(jv: JobView) -> list[str]:
    """The whole picture, for a terminal that redraws it in place."""
    width = max([len(t.pod) for t in jv.targets] + [3])
    lines = [header_line(jv)] + [target_line(t, width) for t in jv.targets]
    waiting = jv.count - len(jv.targets)
    if waiting > 0:
        lines.append(f"{waiting} more target(s) not assigned yet")
    return lines


def redraw(previous_lines: int, lines: list[str], columns: int) -> str:
    """ANSI text that replaces the last `previous_lines` lines with `lines`; each is cut
    to the terminal width so wrapping cannot throw off the cursor arithmetic."""
    out = f"\x1b[{previous_lines}F" if previous_lines else ""
    for line in lines:
        out += "\x1b[2K" + line[: max(1, columns - 1)] + "\n"
    return out + "\x1b[J"


def plain_updates(seen: dict[str, tuple[str, int | None]], jv: JobView) -> list[str]:
    """Lines for a log: one per target whose phase or whole percentage changed since
    the last call (`seen` is updated), plus a job line when the job's phase, targets
    done or whole percentage changed."""
    out = []
    key = (jv.phase, jv.done, percent(jv.bytes, jv.total))
    if seen.get(JOB) != (str(key), None):
        seen[JOB] = (str(key), None)
        out.append(header_line(jv))
    width = max([len(t.pod) for t in jv.targets] + [3])
    for tv in jv.targets:
        state = (tv.phase, percent(tv.bytes, tv.total))
        if seen.get(tv.pod) != state:
            seen[tv.pod] = state
            out.append(target_line(tv, width, with_bar=False))
    return out


def final_line(jv: JobView) -> str:
    if jv.outcome == "Complete":
        return (
            f"refitjob/{jv.name} Complete: {jv.done}/{jv.count} targets hold {jv.version}, "
            f"{fmt_bytes(jv.bytes)} in {fmt_duration(jv.elapsed)} ({fmt_rate(jv.rate)})"
        )
    detail = f": {jv.message}" if jv.message else ""
    return f"refitjob/{jv.name} Failed ({jv.reason or 'Failed'}){detail}"
