"""What a target knows of its sources: gRPC clients, manifests, version words, and the
fence that proves a pull read one version.

A source's manifest is fetched once and reused while the peer's NIXL identity, slab
generation and layout fingerprint are unchanged (its cache key). A warm cycle fences
one-sidedly: the source keeps (nonce, epoch, generation) in a small NIXL-registered
header (version.py), and the target READs it before its data READs and again after
them. GetVersion (and the manifest when the layout changed) is called only when the
header differs, cannot be read, or the source is new.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .errors import FerryError, PeerUnavailable, VersionChanged
from .manifest import Manifest
from .peer import AgentClient
from .request import SourceAddress
from .version import HeaderRegion, HeaderWords, MappedHeader, VersionHeader, is_writing

if TYPE_CHECKING:
    from .auth import PeerTls
    from .transport import NixlTransport

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Source:
    """One source as a pull sees it: its manifest and the version it held when asked.
    `endpoint` is its address as the request named it ("host:port" or "host:port/r")."""

    endpoint: str
    client: AgentClient
    rank: int  # the local rank of the source's pod
    manifest: Manifest
    version: str
    epoch: int
    header: HeaderRegion = HeaderRegion(0, 0, 0, "")
    words: HeaderWords | None = None  # what its header must hold while `version` is read
    mapped: MappedHeader | None = None  # its header file, when it is in our pod

    @property
    def writing(self) -> bool:
        return is_writing(self.epoch)


def version_key(info: Any) -> str:
    """A VersionInfo's manifest cache key (Manifest.cache_key of what it describes)."""
    return f"{info.agent}#{info.generation}#{info.fingerprint}"


def _metadata_of(manifest: Manifest) -> bytes:
    return manifest.nixl_metadata


class PeerCache:
    """Sources by endpoint. `landing` is our registered buffer their headers are READ into."""

    def __init__(
        self,
        transport: NixlTransport,
        token: Callable[[], str],
        landing: VersionHeader,
        host: str = "",
        tls: PeerTls | None = None,
    ) -> None:
        """`host`: our host's boot id; a source on it may share our pod's /dev/shm, and
        then its header is read from the mapped file instead of over NIXL."""
        self.transport = transport
        self.token = token
        self.landing = landing
        self.host = host
        self.tls = tls  # cluster mode: dial peers over mTLS, by pod name
        self._sources: dict[str, Source] = {}
        self._clients: dict[str, AgentClient] = {}
        self._mapped: dict[str, MappedHeader | None] = {}  # header shm name -> mapping

    def client(self, address: str) -> tuple[AgentClient, int]:
        """The gRPC client of the pod at `address`, and the local rank it names."""
        addr = SourceAddress.parse(address)
        key = f"{addr.pod}@{addr.endpoint}"
        c = self._clients.get(key)
        if c is None:
            c = self._clients[key] = AgentClient(
                addr.endpoint, self.token(), tls=self.tls, expect=addr.pod
            )
        return c, addr.rank

    def get(self, endpoint: str) -> Source | None:
        return self._sources.get(endpoint)

    def metadata(self, manifest: Manifest) -> Callable[[], bytes]:
        """What transport.prepare loads when it adds the peer's NIXL agent."""
        return functools.partial(_metadata_of, manifest)

    # -- asking a source what it holds -----------------------------------------------
    def fresh(self, endpoint: str) -> Source:
        """Ask GetVersion; the cached manifest is reused while its cache key is unchanged.
        A peer that does not answer (PeerUnavailable) is forgotten."""
        client, rank = self.client(endpoint)
        info = self._ask(endpoint, functools.partial(client.version, rank=rank))
        key = version_key(info)
        cached = self._sources.get(endpoint)
        if cached is None or cached.manifest.cache_key != key:
            man = self._ask(endpoint, functools.partial(client.manifest, rank=rank))
            if man.cache_key != key:
                raise VersionChanged(f"source {endpoint} re-declared its layout while we read it")
            if cached is not None:
                self.transport.drop(endpoint)
        else:
            man = cached.manifest
        src = Source(
            endpoint,
            client,
            rank,
            man,
            info.version,
            int(info.epoch),
            header=HeaderRegion(
                int(info.header_addr),
                int(info.header_nbytes),
                int(info.header_device),
                info.header_memory,
            ),
            words=HeaderWords(int(info.nonce), int(info.epoch), int(info.generation)),
            mapped=self._map_header(info.header_shm, man),
        )
        self._sources[endpoint] = src
        if src.mapped is None:
            self._prepare_header(src)
        return src

    def _map_header(self, name: str, manifest: Manifest) -> MappedHeader | None:
        """The source's header file, mapped, when it is in our pod (same host, and the file
        opens: a shared /dev/shm); None otherwise (its header is READ over NIXL)."""
        if not name or not self.host or manifest.host_id != self.host:
            return None
        if name not in self._mapped:
            if len(self._mapped) >= 64:  # peers restarted many times: start over
                self._close_mapped()
            try:
                self._mapped[name] = MappedHeader(name)
            except (OSError, ValueError) as exc:
                log.debug("header %s of a peer on this host is not mapped: %s", name, exc)
                self._mapped[name] = None
        return self._mapped[name]

    def cached(self, endpoint: str) -> Source | None:
        """The cached source when its header, READ over NIXL, still shows the agent and
        slabs we saw: no GetVersion (and no manifest) needed. A new stable epoch on the
        same slabs is a new version with the same manifest."""
        src = self._sources.get(endpoint)
        if src is None or src.words is None:
            return None
        got = self.read_header(src)
        if got is None:
            return None
        words, version = got
        if not words.same_agent_and_slabs(src.words) or is_writing(words.epoch) or version is None:
            return None
        if words.epoch != src.epoch:
            src = dataclasses.replace(src, version=version, epoch=words.epoch, words=words)
            self._sources[endpoint] = src
        return src

    def current(self, endpoint: str) -> Source:
        return self.cached(endpoint) or self.fresh(endpoint)

    def adopt(self, endpoint: str, manifest: Manifest, version: str) -> Source:
        """A source known by its manifest alone (a relay's upstream, still pulling: it has
        no stable version words to fence with)."""
        cached = self._sources.get(endpoint)
        if cached is not None and cached.manifest.cache_key != manifest.cache_key:
            self.transport.drop(endpoint)
        client, rank = self.client(endpoint)
        src = Source(endpoint, client, rank, manifest, version, manifest.epoch)
        self._sources[endpoint] = src
        return src

    def _ask(self, endpoint: str, call: Callable[[], Any]) -> Any:
        try:
            return call()
        except PeerUnavailable:
            self.forget(endpoint)
            raise

    def forget(self, endpoint: str) -> None:
        """The peer failed us: ask afresh next time (its client is kept: it reconnects)."""
        self._sources.pop(endpoint, None)

    # -- the fence -------------------------------------------------------------------
    def read_header(self, src: Source) -> tuple[HeaderWords, str | None] | None:
        """The source's header (words, version), READ over NIXL; None when it cannot be
        read (no header, no handle yet, or the READ failed: use GetVersion)."""
        if src.mapped is not None:
            return src.mapped.read()
        if not src.header.addr or not self.transport.has_header(src.endpoint):
            return None
        try:
            self.transport.read_header(src.endpoint)
        except FerryError as exc:
            log.debug("version header of %s: %s", src.endpoint, exc)
            return None
        return self.landing.read()

    def fence(self, srcs: Sequence[Source], deadline: float) -> None:
        """Raise VersionChanged unless every source still holds exactly what we saw."""
        for s in srcs:
            got = self.read_header(s)
            if got is not None:
                words = got[0]
                if words != s.words:
                    now = (
                        "being written" if is_writing(words.epoch) else "a newer version or layout"
                    )
                    raise VersionChanged(
                        f"source {s.endpoint} changed during the pull: had {s.version!r}, {now}",
                        endpoint=s.endpoint,
                        had=s.version,
                        now="",
                    )
                continue
            timeout = max(0.2, min(5.0, deadline - time.monotonic()))
            v = self._ask(
                s.endpoint, functools.partial(s.client.version, timeout=timeout, rank=s.rank)
            )
            if (v.version, int(v.epoch), version_key(v)) != (
                s.version,
                s.epoch,
                s.manifest.cache_key,
            ):
                state = "being written" if is_writing(int(v.epoch)) else f"now {v.version!r}"
                raise VersionChanged(
                    f"source {s.endpoint} changed during the pull: had {s.version!r}, {state}",
                    endpoint=s.endpoint,
                    had=s.version,
                    now=v.version,
                )

    def _prepare_header(self, src: Source) -> None:
        h = src.header
        ok = (
            h.addr
            and src.words is not None
            and src.words.nonce
            and h.nbytes == VersionHeader.NBYTES
        )
        if not ok or h.memory != self.landing.memory:
            return
        try:
            self.transport.prepare_header(
                src.endpoint,
                src.manifest.cache_key,
                self.metadata(src.manifest),
                (self.landing.addr, h.nbytes, self.landing.device_id),
                (h.addr, h.nbytes, h.device),
                self.landing.memory,
            )
        except Exception as exc:  # no header fast path for this peer: GetVersion it is
            log.info("version header of %s not readable over NIXL: %s", src.endpoint, exc)

    def close(self) -> None:
        for c in self._clients.values():
            c.close()
        self._clients.clear()
        self._sources.clear()
        self._close_mapped()

    def _close_mapped(self) -> None:
        for m in self._mapped.values():
            if m is not None:
                m.close()
        self._mapped.clear()
