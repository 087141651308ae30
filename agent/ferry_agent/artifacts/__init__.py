"""ArtifactCache, agent side: identity, pack, trust, verified install, peer fetch.

The gRPC pieces (`service.ArtifactServicer`, `service.serve`, `fetch.fetch`,
`fetch.fetch_and_install`) live in their modules so that importing this
package does not load grpc.
"""

from ferry_agent.artifacts.errors import (
    ArtifactRejected,
    FetchFailed,
    IdentityError,
    MissingIdentityField,
    PackError,
)
from ferry_agent.artifacts.identity import Identity, detect_environment, detect_identity
from ferry_agent.artifacts.install import InstallResult, install, verify
from ferry_agent.artifacts.lock import OnceResult, install_archive_once, install_once
from ferry_agent.artifacts.pack import PackResult, pack
from ferry_agent.artifacts.trust import generate_keypair, load_private_key, load_public_key

__all__ = [
    "ArtifactRejected",
    "FetchFailed",
    "Identity",
    "IdentityError",
    "InstallResult",
    "MissingIdentityField",
    "OnceResult",
    "PackError",
    "PackResult",
    "detect_environment",
    "detect_identity",
    "generate_keypair",
    "install",
    "install_archive_once",
    "install_once",
    "load_private_key",
    "load_public_key",
    "pack",
    "verify",
]
