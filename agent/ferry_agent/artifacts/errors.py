"""Typed errors of the artifact cache.

Every refusal is an `ArtifactRejected` with a short machine-readable `reason`
(stable, used in CR status and metrics) and a `detail` naming the path, field
or value a user needs to act on.
"""

from __future__ import annotations


class ArtifactRejected(Exception):
    """An archive, manifest, signature or fetched chunk failed verification."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail

    @property
    def condition_reason(self) -> str:
        """CamelCase form for Kubernetes conditions and status: `path-traversal` -> `PathTraversal`."""
        return "".join(p.capitalize() for p in self.reason.split("-"))


class IdentityError(ValueError):
    """An identity is incomplete or malformed."""


class MissingIdentityField(IdentityError):
    """A field the cache kind requires is absent or empty."""

    def __init__(self, kind: str, field: str) -> None:
        super().__init__(f"identity of kind {kind!r} requires field {field!r}")
        self.kind = kind
        self.field = field


class PackError(Exception):
    """The source tree cannot be packed (special file, non-UTF-8 name, ...)."""

    def __init__(self, path: str, detail: str) -> None:
        super().__init__(f"{path}: {detail}")
        self.path = path
        self.detail = detail


class FetchFailed(Exception):
    """A peer could not be reached or refused the call (gRPC status code in `code`)."""

    def __init__(self, code: str, detail: str) -> None:
        super().__init__(f"{code}: {detail}")
        self.code = code
        self.detail = detail
