"""ArtifactCache on the agent: sources pack and serve warm JIT caches, targets
install them before their engine starts, each reporting only its own entry.

Configuration (environment, set by the pod spec):
- FERRY_CACHE_DIRS: `kind=dir;kind=dir`, where each cache kind lives in this pod
  (e.g. `triton=/root/.triton/cache;torch-compile=/tmp/torchinductor_root`).
- FERRY_ARTIFACT_STORE: where a source keeps packed archives.
- FERRY_TRUST_DIR: where trust Secrets are mounted, `<dir>/<secret>/<key>`;
  sources sign with `<dir>/<secret>/ed25519.key`.
"""

from __future__ import annotations

import logging
import os
import tempfile
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from kubernetes import client

from ferry_api import GROUP, VERSION, ssa
from ferry_api.artifactcache import ArtifactCache, ArtifactCacheSpec, combined_manifest_id
from ferry_api.meta import selector_matches

from ..artifacts.errors import ArtifactRejected, FetchFailed, IdentityError
from ..artifacts.fetch import fetch_and_install
from ..artifacts.identity import Identity
from ..artifacts.service import ArtifactServicer, ArtifactStore
from ..artifacts.trust import load_private_key, load_public_key
from .reporter import Identity as PodIdentity

log = logging.getLogger(__name__)
PRIVATE_KEY = "ed25519.key"


def cache_dirs(env: dict[str, str] | None = None) -> dict[str, Path]:
    raw = (os.environ if env is None else env).get("FERRY_CACHE_DIRS", "")
    out = {}
    for part in filter(None, (p.strip() for p in raw.split(";"))):
        kind, _, path = part.partition("=")
        if kind and path:
            out[kind.strip()] = Path(path.strip())
    return out


def identities(spec: ArtifactCacheSpec) -> dict[str, Identity]:
    fields = spec.identity.model_dump(exclude_none=True)
    return {kind: Identity.build(kind, fields) for kind in spec.kinds}


def _has_files(path: Path) -> bool:
    return path.is_dir() and any(p.is_file() for p in path.rglob("*"))


class ArtifactStoreError(RuntimeError):
    pass


def store_dir(env: Mapping[str, str]) -> str:
    """FERRY_ARTIFACT_STORE, else a new temporary directory (local processes, tests).
    In a container with a read-only root and no /tmp volume there is none: say which
    variable to set instead of tempfile's "No usable temporary directory"."""
    given = env.get("FERRY_ARTIFACT_STORE")
    if given:
        return given
    try:
        return tempfile.mkdtemp(prefix="ferry-artifacts-")
    except OSError as exc:  # FileNotFoundError: "No usable temporary directory"
        raise ArtifactStoreError(
            "FERRY_ARTIFACT_STORE is unset and there is no writable temporary directory "
            f"({exc}): set FERRY_ARTIFACT_STORE to a writable volume (the injected sidecar "
            "mounts an emptyDir at /var/lib/ferry/artifacts)"
        ) from exc


class ArtifactAgent:
    def __init__(self, agent: Any, poll_s: float = 2.0) -> None:
        """Registers the artifact gRPC service and the startup gate: call before agent.start()."""
        self.agent = agent
        self.poll_s = poll_s
        self.dirs = cache_dirs()
        self.store = ArtifactStore(store_dir(os.environ))
        self.trust_dir = Path(os.environ.get("FERRY_TRUST_DIR", "/etc/ferry/trust"))
        self.ident: PodIdentity | None = None
        self.api: client.ApiClient | None = None
        self.manager = ""
        self._written: dict[str, dict[str, Any]] = {}
        self._settled: dict[str, bool] = {}  # AC uid -> this target installed or gave up
        self._deadlines: dict[str, float] = {}
        self._first_pass = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        agent.add_servicer(_add_servicer, ArtifactServicer(self.store))
        agent.add_startup_gate(self.started)

    # -- lifecycle ---------------------------------------------------------------
    def bind(self, ident: PodIdentity, api: client.ApiClient) -> ArtifactAgent:
        self.ident, self.api = ident, api
        self.manager = ssa.agent_manager(ident.pod)
        return self

    def start(self) -> ArtifactAgent:
        self._thread = threading.Thread(target=self._loop, name="ferry-artifacts", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)

    def started(self) -> bool:
        """True once every cache this pod must install is installed or given up on."""
        return self._first_pass.is_set() and all(self._settled.values())

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.tick()
            except Exception as exc:
                log.warning("artifact cache check failed: %s", exc)
            self._first_pass.set()
            self._stop.wait(self.poll_s)

    # -- one pass ----------------------------------------------------------------
    def tick(self) -> None:
        labels = (
            client.CoreV1Api(self.api)
            .read_namespaced_pod(self.ident.pod, self.ident.namespace)
            .metadata.labels
            or {}
        )
        items = client.CustomObjectsApi(self.api).list_namespaced_custom_object(
            GROUP, VERSION, self.ident.namespace, ArtifactCache.PLURAL
        )["items"]
        for ac in items:
            spec = ac["spec"]
            if selector_matches(spec.get("sources") or {}, labels):
                self._as_source(ac)
            elif selector_matches(spec.get("targets") or {}, labels):
                self._as_target(ac)

    def _as_source(self, ac: dict[str, Any]) -> None:
        spec = ArtifactCacheSpec.model_validate(ac["spec"])
        key = None
        if spec.trust and spec.trust.secret_ref:
            path = self.trust_dir / spec.trust.secret_ref / PRIVATE_KEY
            if not path.exists():
                self._report(
                    ac,
                    {
                        "role": "source",
                        "state": "Missing",
                        "reason": "SigningKeyMissing",
                        "message": f"spec.trust is set but {path} is not mounted",
                    },
                )
                return
            key = load_private_key(path)
        caches, missing = [], []
        for kind, ident in identities(spec).items():
            info = self.store.by_identity(ident.hash)
            if info is None and kind in self.dirs and _has_files(self.dirs[kind]):
                info = self.store.publish(self.dirs[kind], ident, key=key)
                log.info(
                    "packed %s cache %s (%d files)",
                    kind,
                    info.manifest_id[:19],
                    len(info.manifest.files),
                )
            if info is None:
                missing.append(kind)
                continue
            caches.append(
                {
                    "kind": kind,
                    "identity": ident.hash,
                    "manifestId": info.manifest_id,
                    "bytes": info.manifest.payload_size,
                    "files": len(info.manifest.files),
                }
            )
        entry: dict[str, Any] = {
            "role": "source",
            "state": "Missing" if missing else "Packed",
            "caches": caches,
        }
        if missing:
            entry.update(
                reason="NoWarmCache", message=f"no warm cache here for {', '.join(missing)}"
            )
        self._report(ac, entry)

    def _as_target(self, ac: dict[str, Any]) -> None:
        uid = ac["metadata"]["uid"]
        spec = ArtifactCacheSpec.model_validate(ac["spec"])
        status = ac.get("status") or {}
        self._settled.setdefault(uid, False)
        deadline = self._deadlines.setdefault(uid, time.monotonic() + spec.install_timeout_seconds)
        mine = next((m for m in status.get("members") or [] if m.get("pod") == self.ident.pod), {})
        want = status.get("manifestId")
        if (
            mine.get("state") == "Installed"
            and want
            and combined_manifest_id(mine.get("caches") or [{"kind": "", "manifestId": ""}]) == want
        ):
            self._settled[uid] = True
            return
        if self._settled[uid] and mine.get("state") == "Failed":
            return  # gave up; the engine started cold
        source = next(
            (m for m in status.get("members") or [] if m.get("pod") == status.get("source")), None
        )
        if not want or source is None or not source.get("endpoint"):
            if time.monotonic() > deadline:
                self._give_up(ac, "NoSource", "no warm source within spec.installTimeoutSeconds")
            else:
                self._report(ac, {"role": "target", "state": "Waiting"})
            return
        pubkey, refusal = self._trust_key(spec)
        if refusal is not None:
            self._give_up(ac, *refusal)
            return
        self._report(ac, {"role": "target", "state": "Installing"})
        installed = []
        try:
            for cache in status.get("caches") or []:
                kind = cache["kind"]
                into = self.dirs.get(kind)
                if into is None:
                    raise ArtifactRejected(
                        "no-cache-dir", f"FERRY_CACHE_DIRS names no directory for {kind}"
                    )
                into.mkdir(parents=True, exist_ok=True)
                result = fetch_and_install(
                    source["endpoint"],
                    cache["identity"],
                    self.agent.token(),
                    into,
                    pubkey=pubkey,
                    expected_id=cache["manifestId"],
                    max_bytes=spec.max_bytes,
                    timeout=max(5.0, deadline - time.monotonic()),
                    wait_timeout=max(5.0, deadline - time.monotonic()),
                    tls=self.agent.tls,
                    pod=str(source.get("pod") or ""),
                )
                if not result.ok:
                    raise ArtifactRejected(
                        result.reason or "install-failed", f"{kind}: {result.state}"
                    )
                installed.append(cache)
        except ArtifactRejected as exc:
            self._give_up(ac, exc.condition_reason, str(exc))
            return
        except FetchFailed as exc:
            self._give_up(ac, "SourceUnavailable", str(exc))
            return
        except IdentityError as exc:
            self._give_up(ac, "InvalidIdentity", str(exc))
            return
        # Trusted=False: accepted with no signature checked (spec.trust.allowUnsigned)
        self._report(
            ac,
            {
                "role": "target",
                "state": "Installed",
                "caches": installed,
                "trusted": pubkey is not None,
            },
        )
        self._settled[uid] = True
        log.info(
            "installed %s into %s",
            want[:19],
            ", ".join(str(self.dirs[c["kind"]]) for c in installed),
        )

    def _trust_key(self, spec: ArtifactCacheSpec) -> tuple[Any, tuple[str, str] | None]:
        """The public key to verify with (None: unsigned caches are accepted), or why
        nothing may be installed. Unsigned caches need spec.trust.allowUnsigned: a cache
        holds .so files and Python the engine runs."""
        trust = spec.trust
        if trust is None:
            return None, (
                "UnsignedNotAllowed",
                "spec.trust is not set: caches are refused; set spec.trust.secretRef "
                "(signed caches) or spec.trust.allowUnsigned: true (unsigned caches)",
            )
        if trust.secret_ref:
            path = self.trust_dir / trust.secret_ref / trust.key
            if path.exists():
                return load_public_key(path), None
            if not trust.allow_unsigned:
                return None, (
                    "TrustKeyMissing",
                    f"spec.trust.secretRef is set but {path} is not mounted "
                    "(spec.trust.allowUnsigned is not true)",
                )
        elif not trust.allow_unsigned:  # the CRD's rule refuses this; kept for old objects
            return None, (
                "UnsignedNotAllowed",
                "spec.trust has no secretRef and spec.trust.allowUnsigned is not true",
            )
        return None, None

    def _give_up(self, ac: dict[str, Any], reason: str, message: str) -> None:
        log.warning(
            "giving up on artifact cache %s: %s: %s", ac["metadata"]["name"], reason, message
        )
        self._report(
            ac, {"role": "target", "state": "Failed", "reason": reason, "message": message[:1000]}
        )
        self._settled[ac["metadata"]["uid"]] = True

    def _report(self, ac: dict[str, Any], entry: dict[str, Any]) -> None:
        name = ac["metadata"]["name"]
        entry = {"pod": self.ident.pod, "endpoint": self.ident.endpoint, **entry}
        if self._written.get(name) == entry:
            return
        ssa.apply_status(
            self.api, ArtifactCache, self.ident.namespace, name, {"members": [entry]}, self.manager
        )
        self._written[name] = entry


def _add_servicer(servicer: Any, server: Any) -> None:
    from ..artifacts import artifacts_pb2_grpc as pb_grpc

    pb_grpc.add_ArtifactServiceServicer_to_server(servicer, server)
