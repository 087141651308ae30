"""Typed errors of the data plane.

Each error carries a `reason` (a CamelCase word the operator copies into a
RefitJob's per-target entry and condition) and the fields a user needs to act.
`from_reason` rebuilds the typed error on the far side of a gRPC call.
"""

from __future__ import annotations

from typing import Any


class FerryError(Exception):
    reason = "TransferFailed"

    def __init__(self, message: str, **fields: Any) -> None:
        super().__init__(message)
        self.message = message
        self.fields = fields

    def to_dict(self) -> dict[str, Any]:
        return {"reason": self.reason, "message": self.message, **self.fields}


class TransferFailed(FerryError):
    """NIXL reported an error, or the transfer could not be posted."""

    reason = "TransferFailed"


class LayoutMismatch(FerryError):
    """Source and target tensors do not pair: missing names, dtype or size differences.

    `differences` lists the first few, e.g. ``"layers.0.w: dtype bfloat16 != float16"``.
    """

    reason = "LayoutMismatch"

    def __init__(self, message: str, differences: list[str] | None = None, **fields: Any) -> None:
        super().__init__(message, differences=list(differences or []), **fields)
        self.differences = list(differences or [])


class SourceStale(FerryError):
    """The source does not hold the requested version (or is mid-write)."""

    reason = "SourceStale"


class VersionChanged(SourceStale):
    """The source published a new version (or started writing) while we pulled."""

    reason = "VersionChanged"


class TransferTimeout(FerryError):
    """The pull did not finish before its deadline."""

    reason = "DeadlineExceeded"


class PeerUnavailable(FerryError):
    """The source agent cannot be reached (gRPC down, process gone, NIXL peer error)."""

    reason = "PeerUnavailable"


class EngineNotQuiesced(FerryError):
    """The engine did not acknowledge a pause request within its deadline."""

    reason = "EngineNotQuiesced"


class Cancelled(FerryError):
    """The pull was cancelled (job deleted, failed or re-assigned); no version is served."""

    reason = "Cancelled"


class RelayBroken(SourceStale):
    """The upstream relay failed, restarted its pull or changed version while we followed it:
    the operator re-links this target."""

    reason = "RelayBroken"


class ManifestRejected(FerryError):
    """A peer's manifest is malformed (a tensor outside its slab, sizes that do not
    match dtype and shape, duplicate names, ...): nothing is read from that peer.

    `problem` names the first offending tensor or slab."""

    reason = "ManifestRejected"


class Unauthenticated(FerryError):
    reason = "Unauthenticated"


class NotDeclared(FerryError):
    """No tensor layout has been declared on this agent yet."""

    reason = "NotDeclared"


_BY_REASON: dict[str, type[FerryError]] = {
    cls.reason: cls
    for cls in (
        TransferFailed,
        LayoutMismatch,
        SourceStale,
        VersionChanged,
        TransferTimeout,
        PeerUnavailable,
        EngineNotQuiesced,
        Cancelled,
        RelayBroken,
        ManifestRejected,
        Unauthenticated,
        NotDeclared,
    )
}


def from_reason(reason: str, message: str, **fields: Any) -> FerryError:
    cls = _BY_REASON.get(reason, TransferFailed)
    if cls is LayoutMismatch:
        return LayoutMismatch(message, differences=list(fields.pop("differences", [])), **fields)
    return cls(message, **fields)
