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


class BadRequest(FerryError, ValueError):
    """A request the agent refuses before acting on it (a field out of its bounds, a
    combination that cannot run); the message names the field."""

    reason = "BadRequest"


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


class LayoutTooLarge(FerryError):
    """A layout that would take more memory than a limit allows: refused before any
    slab is allocated. `limit` names the limit (`max_bytes`, the WeightSource's
    status.bytes; `--max-slab-bytes`, the agent's own), `limit_bytes` its value and
    `bytes` what the layout needs."""

    reason = "LayoutTooLarge"


class SourceStale(FerryError):
    """The source does not hold the requested version (or is mid-write)."""

    reason = "SourceStale"


class VersionChanged(SourceStale):
    """The source published a new version (or started writing) while we pulled."""

    reason = "VersionChanged"


class TransferTimeout(FerryError):
    """The pull did not finish before its deadline."""

    reason = "DeadlineExceeded"


class SourceStalled(TransferTimeout):
    """No bytes landed for the pull's stall timeout while READs were outstanding: the
    source hangs (frozen, overloaded, its link gone) though it may still look alive."""

    reason = "SourceStalled"


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


class DigestMismatch(FerryError):
    """Bytes that landed do not match the source's content digests for the version: the
    attempt fails before the version is served (the engine never sees them) and the
    operator retries on another source. `tensors` names them; `differences` gives the
    byte ranges and digests."""

    reason = "DigestMismatch"


class DigestsUnavailable(SourceStale):
    """The source has no content digests for the version we pulled (it stopped serving
    it, or never computed them), and the pull's verify mode needs them."""

    reason = "DigestsUnavailable"


class Unauthenticated(FerryError):
    reason = "Unauthenticated"


class PeerRefused(FerryError):
    """In cluster mode: the peer is not one we may talk to (not a current member of a
    WeightSource we share, nor a target of a job on it), or the address names no pod
    whose certificate could be checked, or the peer refused us. Nothing was sent to it."""

    reason = "PeerRefused"


class NotDeclared(FerryError):
    """No tensor layout has been declared on this agent yet."""

    reason = "NotDeclared"


def _typed(cls: type[FerryError]) -> list[type[FerryError]]:
    return [c for sub in cls.__subclasses__() for c in (sub, *_typed(sub))]


# Every error class defined here, by its reason (a new class cannot be left out).
_BY_REASON: dict[str, type[FerryError]] = {cls.reason: cls for cls in _typed(FerryError)}


def from_reason(reason: str, message: str, **fields: Any) -> FerryError:
    """The typed error a peer reported; a reason this side has no class for keeps its
    reason (a FerryError carrying it), so nothing a user acts on is renamed in transit."""
    cls = _BY_REASON.get(reason)
    if cls is None:
        err = FerryError(message, **fields)
        err.reason = reason or FerryError.reason
        return err
    if cls is LayoutMismatch:
        return LayoutMismatch(message, differences=list(fields.pop("differences", [])), **fields)
    return cls(message, **fields)
