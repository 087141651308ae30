"""Human units for bytes, rates, durations and ages (decimal: 1 GB = 1e9 bytes,
the unit the operator's status.throughput uses)."""

from __future__ import annotations

from datetime import datetime

from ferry_api import times

_PREFIXES = ("", "k", "M", "G", "T", "P")


def fmt_bytes(n: float | None, sep: str = " ") -> str:
    if n is None:
        return "-"
    value, i = float(n), 0
    while abs(value) >= 1000 and i < len(_PREFIXES) - 1:
        value, i = value / 1000, i + 1
    if i == 0:
        return f"{int(value)}{sep}B"
    return f"{value:.1f}{sep}{_PREFIXES[i]}B"


def fmt_rate(bytes_per_s: float | None) -> str:
    if bytes_per_s is None:
        return "-"
    if bytes_per_s >= 1e9:
        return f"{bytes_per_s / 1e9:.2f} GB/s"
    return f"{fmt_bytes(bytes_per_s)}/s"


def fmt_duration(seconds: float | None) -> str:
    """3s, 1m05s, 2h03m; '-' when unknown."""
    if seconds is None or seconds < 0:
        return "-"
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def fmt_age(ts: datetime | str | None, now: datetime) -> str:
    """kubectl's AGE style: 45s, 12m, 5h, 3d."""
    then = times.parse(ts)
    if then is None:
        return "-"
    s = max(0, int((now - then).total_seconds()))
    if s < 120:
        return f"{s}s"
    if s < 2 * 3600:
        return f"{s // 60}m"
    if s < 2 * 86400:
        return f"{s // 3600}h"
    return f"{s // 86400}d"


def parse_quantity(text: str) -> int:
    """Bytes from a Kubernetes-style quantity: 1048576, 64Mi, 1Gi, 500M."""
    units = {
        "Ki": 1 << 10,
        "Mi": 1 << 20,
        "Gi": 1 << 30,
        "Ti": 1 << 40,
        "k": 10**3,
        "K": 10**3,
        "M": 10**6,
        "G": 10**9,
        "T": 10**12,
    }
    text = text.strip()
    for suffix in sorted(units, key=len, reverse=True):
        if text.endswith(suffix):
            number = text[: -len(suffix)]
            if number.isdigit():
                return int(number) * units[suffix]
            break
    if text.isdigit():
        return int(text)
    raise ValueError(f"{text!r} is not a byte quantity (use e.g. 1048576, 1Mi, 64Mi)")
