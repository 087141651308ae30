"""The Agent: owns slabs, serves its manifest, and pulls from peers.

Programmatic use (what `ferry agent run`, the bench and the operator's dev
harness do):

    agent = Agent(AgentConfig(pod="w-0", token="...")).start()
    agent.declare(specs)                  # or let an engine declare via ferry_agent.client
    agent.publish("step-100")             # source side
    result = agent.pull(["10.0.0.5:7470"], version="latest", timeout_s=60)  # target side
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import secrets
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from . import rails as rails_mod
from .control import ControlServer, EngineLink
from .errors import FerryError, NotDeclared, PeerUnavailable, VersionChanged
from .layout import Layout, TensorSpec, plan_layout
from .manifest import Manifest, descriptor_arrays
from .metrics import AgentMetrics, MetricsServer
from .nixl_engine import (
    DEFAULT_HOST_LANES,
    DEFAULT_POST_THREADS,
    DEFAULT_PROGRESS_DELAY_US,
    NixlEngine,
)
from .peer import AgentClient
from .planner import Plan, Segment, build_plan
from .slabs import PAGE, VersionHeader, create_slabs, reap_stale

log = logging.getLogger(__name__)

# 64 MiB chunks: 16 descriptors for 1 GiB, enough to keep several READs in flight.
DEFAULT_CHUNK = 64 << 20
# Descriptor groups per peer: one READ handle each. NIXL-NOTES: ~10k descriptors
# posted at once have wedged UCX send queues, so large plans are grouped.
MAX_HANDLES_PER_PEER = 256


@dataclass
class AgentConfig:
    pod: str = "local"
    namespace: str = "default"
    pod_ip: str = "127.0.0.1"
    grpc_host: str = "0.0.0.0"
    grpc_port: int = 0  # 0: pick a free port
    metrics_port: int | None = None
    control_socket: str | None = None
    memory: str = "host"  # host | cuda
    device: int = 0
    slab_bytes: int = 1 << 30
    chunk_bytes: int = DEFAULT_CHUNK
    max_inflight: int = 32
    token: str | None = None
    token_file: str | None = None
    rails: str = "auto"  # auto | stripe | off | explicit map "0=mlx5_0:1,1=mlx5_1:1"
    sysfs_root: str = "/sys"
    nixl_threads: int = 0
    post_threads: int = DEFAULT_POST_THREADS
    lanes: int = 0  # NIXL agents used for our READs; 0: 2 for host memory, 1 for cuda
    header_memory: str = "host"  # host | slab: where the version headers live
    progress_delay_us: int = DEFAULT_PROGRESS_DELAY_US
    shm_prefix: str = "ferry"


@dataclass
class PullResult:
    version: str
    bytes: int
    seconds: float
    descriptors: int
    attempts: int
    sources: list[str]
    register_s: float = 0.0
    total_s: float = 0.0  # whole cycle: versions, plan, prepare, READs, fence
    source_bytes: dict[str, int] = field(default_factory=dict)
    stats: dict[str, int] = field(default_factory=dict)
    phases_s: dict[str, float] = field(default_factory=dict)  # see pull.Phases

    @property
    def gbps(self) -> float:
        return self.bytes / self.seconds / 1e9 if self.seconds > 0 else 0.0


@dataclass
class _Source:
    endpoint: str
    client: AgentClient
    manifest: Manifest
    version: str
    epoch: int
    # The peer's version header (VersionInfo.header_*), 0 addr: none; and the words
    # (nonce, epoch, generation) it must hold while `version` is what we read.
    header: tuple[int, int, int] = (0, 0, 0)
    header_memory: str = ""
    words: tuple[int, ...] = ()


class Agent:
    def __init__(self, config: AgentConfig):
        self.config = config
        self.metrics = AgentMetrics()
        if config.token is None and config.token_file is None:
            raise ValueError("an agent needs a token or token_file: peers must authenticate")
        self._token_file = None
        if config.token_file:
            from .auth import TokenFile

            self._token_file = TokenFile(config.token_file)
        # UCX splits a CMA READ into 512 KiB process_vm_readv calls by default; 64 MiB
        # pieces measured ~20% faster here. A value set by the operator wins.
        os.environ.setdefault("UCX_CMA_SEG_SIZE", "64m")
        # UCX reads UCX_NET_DEVICES when NIXL creates its UCX context: pin rails first.
        self.rails = rails_mod.apply(
            os.environ,
            config.rails,
            gpu=config.device if config.memory == "cuda" else None,
            sysfs_root=config.sysfs_root,
        )
        if config.memory == "host":
            stale = reap_stale(f"{config.shm_prefix}-{config.pod}")
            if stale:
                log.warning(
                    "removed %d slabs left by a dead agent of this pod: %s", len(stale), stale
                )
        self.name = f"{config.namespace}.{config.pod}.{secrets.token_hex(4)}"
        self.engine = NixlEngine(
            self.name,
            lanes=config.lanes or (DEFAULT_HOST_LANES if config.memory == "host" else 1),
            num_threads=config.nixl_threads,
            post_threads=config.post_threads,
            progress_delay_us=config.progress_delay_us,
            thread_init=self._cuda_thread_init if config.memory == "cuda" else None,
        )
        self.link = EngineLink()
        self._lock = threading.RLock()
        self._pull_lock = threading.Lock()
        self._layout: Layout | None = None
        self._slabs: list[Any] = []
        self._reg: Any = None
        # Double buffer: a second slab set of the same layout, registered once and kept.
        self._standby: list[Any] = []
        self._standby_reg: Any = None
        self._tracker: Any = None  # PullTracker of the last single-buffer pull (relays)
        self._generation = 0
        self._plan_cache: tuple[Any, Any, Plan] | None = None
        self._prep_cache: dict[tuple, tuple] = {}
        self._version_label: tuple[str, str] | None = None
        self._version = ""
        self._epoch = 0
        self._pulling = False
        self._peers: dict[str, _Source] = {}
        self.register_s = 0.0  # the slab registration call of the last declare
        self.alloc_s = 0.0  # the slab allocation of the last declare
        self.server: Any = None
        self.control: ControlServer | None = None
        self.metrics_server: MetricsServer | None = None
        self._extra_servicers: list[tuple[Any, Any]] = []
        self.startup_gates: list[Any] = []

        self._nonce = secrets.randbits(63) | 1
        self._init_headers()

    def _init_headers(self) -> None:
        """Our version header (peers READ it) and the landing header (we READ theirs into
        it), registered now, before any peer loads our metadata.

        They live in host memory by default, whatever the slabs are: the fence is two
        256-byte READs per cycle, and from DRAM they need no CUDA copy to write or to
        look at (on the H200 pair, VRAM headers cost a warm 8 GB cycle about 2.7% on
        top of its READs: docs/benchmarks.md). `header_memory="slab"` keeps them in the
        slabs' memory kind. A CUDA agent still makes its first CUDA allocation and
        first VRAM registration here (a one-page warm-up region, kept registered), so
        the weight slabs' registration is not the one that pays for the CUDA context
        and UCX's CUDA set-up."""
        t0 = time.perf_counter()
        cuda = self.config.memory == "cuda"
        kind = self.config.memory if self.config.header_memory == "slab" else "host"
        self._header = VersionHeader(kind, self.config.device)
        self._landing = VersionHeader(kind, self.config.device)
        self._warmup: list[Any] = []
        if cuda and kind == "host":
            from .cuda import CudaSlab

            self._warmup = [CudaSlab.create(0, PAGE, device=self.config.device)]
        t1 = time.perf_counter()
        mem = self._header.memory
        self._header_reg = self.engine.register([self._header.region, self._landing.region], mem)
        self._warmup_reg = (
            self.engine.register([(w.addr, w.nbytes, w.device_id) for w in self._warmup], "VRAM")
            if self._warmup
            else None
        )
        t2 = time.perf_counter()
        self.startup_alloc_s, self.startup_register_s = t1 - t0, t2 - t1
        self._write_header()
        log.info(
            "start-up: version headers (%s) allocated in %.1f ms, registered in %.1f ms",
            mem,
            (t1 - t0) * 1e3,
            (t2 - t1) * 1e3,
        )

    def _write_header(self) -> None:
        self._header.write((self._nonce, self._epoch, self._generation), self._version)

    def header_info(self) -> dict[str, Any]:
        """VersionInfo's header fields (see ferry_agent.proto)."""
        return {
            "header_addr": self._header.addr,
            "header_nbytes": VersionHeader.NBYTES,
            "header_device": self._header.device_id,
            "header_memory": self._header.memory,
            "nonce": self._nonce,
        }

    def read_header(self, src: _Source) -> tuple[tuple[int, ...], str | None] | None:
        """The source's header (words, version), READ over NIXL; None when it cannot be read
        (no header, no handle yet, or the READ failed: use GetVersion)."""
        if not src.header[0] or not self.engine.has_header(src.endpoint):
            return None
        try:
            self.engine.read_header(src.endpoint)
        except FerryError as exc:
            log.debug("version header of %s: %s", src.endpoint, exc)
            return None
        return self._landing.read()

    def _cuda_thread_init(self) -> None:
        from .cuda import set_device

        set_device(self.config.device)

    # -- lifecycle ----------------------------------------------------------------
    def token(self) -> str:
        return self._token_file.get() if self._token_file else str(self.config.token)

    def add_startup_gate(self, gate: Any) -> None:
        """A check that must pass before /startupz does (e.g. caches installed or given up)."""
        self.startup_gates.append(gate)

    def add_servicer(self, add_fn: Any, servicer: Any) -> None:
        """Serve another gRPC service (same port, same token check); call before start()."""
        self._extra_servicers.append((add_fn, servicer))

    def start(self) -> Agent:
        from .server import AgentServer

        self.server = AgentServer(self, self.config.grpc_host, self.config.grpc_port, self.token)
        for add_fn, servicer in self._extra_servicers:
            self.server.add_servicer(add_fn, servicer)
        self.server.start()
        if self.config.control_socket:
            from .engine_api import handle_control

            self.control = ControlServer(
                self.config.control_socket, lambda op, msg: handle_control(self, op, msg), self.link
            ).start()
        if self.config.metrics_port is not None:
            self.metrics_server = MetricsServer(
                self.metrics,
                self.config.metrics_port,
                ready=lambda: self._layout is not None,
                started=lambda: all(gate() for gate in self.startup_gates),
            ).start()
        return self

    @property
    def endpoint(self) -> str:
        port = self.server.port if self.server else self.config.grpc_port
        return f"{self.config.pod_ip}:{port}"

    def close(self) -> None:
        if self.control:
            self.control.stop()
        if self.server:
            self.server.stop()
        if self.metrics_server:
            self.metrics_server.stop()
        for src in self._peers.values():
            src.client.close()
        self._peers.clear()
        self.engine.close()
        self._free_slabs()
        if self._header_reg is not None:
            self._release(self._header_reg, [self._header, self._landing])
            self._header_reg = None
        if self._warmup_reg is not None:
            self._release(self._warmup_reg, self._warmup)
            self._warmup_reg, self._warmup = None, []

    def _free_slabs(self) -> None:
        with self._lock:
            self._release(self._reg, self._slabs)
            self._reg, self._slabs = None, []
            self._release(self._standby_reg, self._standby)
            self._standby_reg, self._standby = None, []
            self._tracker = None

    def _release(self, reg: Any, slabs: list[Any]) -> None:
        if reg is not None:
            self.engine.deregister(reg, len(slabs))
        for s in slabs:
            s.close()

    def _allocate(self, layout: Layout) -> tuple[list[Any], Any, float, float]:
        """Slabs, their registration, and how long allocating and registering took."""
        t0 = time.perf_counter()
        slabs = create_slabs(
            layout.slab_sizes,
            self.config.memory,
            prefix=f"{self.config.shm_prefix}-{self.config.pod}",
            device=self.config.device,
        )
        t1 = time.perf_counter()
        mem = "VRAM" if self.config.memory == "cuda" else "DRAM"
        try:
            reg = self.engine.register([(s.addr, s.nbytes, s.device_id) for s in slabs], mem)
        except BaseException:
            for s in slabs:
                s.close()
            raise
        return slabs, reg, t1 - t0, time.perf_counter() - t1

    # -- layout and versions -------------------------------------------------------
    def declare(self, specs: Sequence[TensorSpec]) -> bool:
        """Allocate and register slabs for `specs`. Returns False when the same layout is
        already in place (nothing re-allocated or re-registered)."""
        layout = plan_layout(list(specs), self.config.slab_bytes)
        with self._lock:
            if self._layout is not None and self._layout.fingerprint == layout.fingerprint:
                return False
            self._free_slabs()
            slabs, self._reg, self.alloc_s, self.register_s = self._allocate(layout)
            self.metrics.registration_seconds.observe(self.register_s)
            self._slabs, self._layout = slabs, layout
            self._generation += 1
            self._version, self._epoch = "", self._epoch + (2 - self._epoch % 2)
            self._write_header()
            log.info(
                "declared %d tensors, %d slabs, %.1f MiB, allocated in %.3f ms, registered in %.3f ms",
                len(specs),
                len(slabs),
                layout.nbytes / 2**20,
                self.alloc_s * 1e3,
                self.register_s * 1e3,
            )
            return True

    @property
    def layout(self) -> Layout:
        if self._layout is None:
            raise NotDeclared("no tensor layout declared on this agent")
        return self._layout

    @property
    def slabs(self) -> list[Any]:
        return list(self._slabs)

    def views(self) -> dict[str, Any]:
        from .views import tensor_views

        return tensor_views(self._slabs, self.layout.placements)

    def begin_write(self) -> int:
        """Mark the slabs as being written (odd epoch): peers will not trust a pull."""
        with self._lock:
            if self._epoch % 2 == 0:
                self._epoch += 1
                self._write_header()
            return self._epoch

    def publish(self, version: str) -> int:
        """New weights are in place: serve them as `version` (even epoch)."""
        if not version:
            raise ValueError("version must not be empty")
        self.layout  # noqa: B018 - raises NotDeclared
        with self._lock:
            self._epoch += 2 - self._epoch % 2
            self._version = version
            self._write_header()
            label = (version, self.layout.fingerprint)
            if label != self._version_label:  # a refit to the same labels changes no series
                self.metrics.version_info.clear()
                self.metrics.version_info.labels(*label).set(1)
                self._version_label = label
            return self._epoch

    def version_info(self) -> dict[str, Any]:
        with self._lock:
            return {
                "version": self._version,
                "epoch": self._epoch,
                "agent": self.name,
                "fingerprint": self._layout.fingerprint if self._layout else "",
                "generation": self._generation,
            }

    @property
    def state(self) -> str:
        """Empty | Declared | Ready | Writing (engine) | Pulling (READs into our slabs)."""
        if self._layout is None:
            return "Empty"
        if self._epoch % 2:
            return "Pulling" if self._pulling else "Writing"
        return "Ready" if self._version else "Declared"

    def manifest(self, *, with_metadata: bool = True) -> Manifest:
        with self._lock:
            layout = self.layout
            return Manifest(
                agent=self.name,
                pod=self.config.pod,
                namespace=self.config.namespace,
                version=self._version,
                epoch=self._epoch,
                fingerprint=layout.fingerprint,
                generation=self._generation,
                memory=self.config.memory,
                tensors=layout.placements,
                slabs=tuple(s.info for s in self._slabs),
                nixl_metadata=self.engine.metadata() if with_metadata else b"",
                alignment=layout.alignment,
            )

    # -- pulling -------------------------------------------------------------------
    def pull(
        self,
        sources: Sequence[str],
        *,
        version: str | None = None,
        timeout_s: float = 60.0,
        chunk_bytes: int | None = None,
        max_gbps: float | None = None,
        retries: int = 2,
        quiesce: bool = False,
        quiesce_timeout_s: float = 30.0,
        cancel: threading.Event | None = None,
        progress: Callable[[int], None] | None = None,
        relay: bool = False,
        double_buffer: bool = False,
    ) -> PullResult:
        """Pull `version` (None/"latest": whatever the sources hold) into our slabs.

        Raises LayoutMismatch before any byte moves, SourceStale / VersionChanged when
        the sources do not hold (or stop holding) the version, PeerUnavailable,
        TransferTimeout past `timeout_s`, Cancelled within ~0.1 s of `cancel` being
        set (in-flight READs aborted, slabs serve no version, engine resumed with
        ok=False). Never returns on mixed versions.

        progress(bytes): bytes landed so far, from the pulling thread every ~50 ms.
        relay: the one source is a target still pulling `version`; follow it chunk by
        chunk (see relay.py). double_buffer: READ into the standby slab set while the
        engine keeps reading, then pause only for the swap (the engine re-attaches)."""
        from .pull import PullOptions, run_pull
        from .relay import run_relay

        opts = PullOptions(
            want=None if version in (None, "", "latest") else version,
            deadline=time.monotonic() + timeout_s,
            chunk_bytes=chunk_bytes or self.config.chunk_bytes,
            max_gbps=max_gbps,
            retries=retries,
            quiesce=quiesce,
            quiesce_timeout_s=quiesce_timeout_s,
            cancel=cancel,
            progress=progress,
            double_buffer=double_buffer,
        )
        if relay and (len(sources) != 1 or double_buffer):
            raise ValueError("a relay pull follows exactly one upstream, without double buffer")
        if self.config.memory == "cuda":
            self._cuda_thread_init()  # gRPC threads prepare VRAM descriptor lists
        with self._pull_lock:
            self._pulling = True
            try:
                if relay:
                    return run_relay(self, sources[0], opts)
                return run_pull(self, list(sources), opts)
            except FerryError as exc:
                self.metrics.failures.labels(exc.reason).inc()
                raise
            finally:
                self._pulling = False

    # used by pull.py ------------------------------------------------------------------
    def _peer(self, endpoint: str) -> AgentClient:
        src = self._peers.get(endpoint)
        return src.client if src else AgentClient(endpoint, self.token())

    def _source(self, endpoint: str, client: AgentClient) -> _Source:
        """Fresh version info; the cached manifest is reused while the peer's agent,
        slab generation and fingerprint are unchanged."""
        info = client.version()
        key = f"{info.agent}#{info.generation}#{info.fingerprint}"
        cached = self._peers.get(endpoint)
        if cached is None or cached.manifest.cache_key != key:
            man = client.manifest()
            if man.cache_key != key:
                raise VersionChanged(f"source {endpoint} re-declared its layout while we read it")
            if cached is not None:
                self.engine.drop(endpoint)
        else:
            man = cached.manifest
        src = _Source(
            endpoint,
            client,
            man,
            info.version,
            int(info.epoch),
            header=(int(info.header_addr), int(info.header_nbytes), int(info.header_device)),
            header_memory=info.header_memory,
            words=(int(info.nonce), int(info.epoch), int(info.generation)),
        )
        self._peers[endpoint] = src
        self._prepare_header(src)
        return src

    def _source_cached(self, endpoint: str) -> _Source | None:
        """The cached source when its version header READ over NIXL still shows the words
        we saw: nothing changed since, so no GetVersion (and no manifest) is needed."""
        src = self._peers.get(endpoint)
        if src is None or not src.words:
            return None
        got = self.read_header(src)
        if got is None:
            return None
        words, version = got
        same = words[0] == src.words[0] and words[2] == src.words[2]  # agent, slabs
        if not same or words[1] % 2 or version is None:
            return None
        if words[1] != src.epoch:  # a new version on the same slabs: manifest still good
            src = dataclasses.replace(src, version=version, epoch=words[1], words=words)
            self._peers[endpoint] = src
        return src

    def _prepare_header(self, src: _Source) -> None:
        addr, nbytes, dev = src.header
        ok = addr and src.words[0] and nbytes == VersionHeader.NBYTES
        if not ok or src.header_memory != self._landing.memory:
            return
        try:
            self.engine.prepare_header(
                src.endpoint,
                src.manifest.cache_key,
                functools.partial(_metadata_of, src.manifest),
                (self._landing.addr, nbytes, self._landing.device_id),
                (addr, nbytes, dev),
                self._landing.memory,
            )
        except Exception as exc:  # no header fast path for this peer: GetVersion it is
            log.info("version header of %s not readable over NIXL: %s", src.endpoint, exc)

    def _plan(self, srcs: list[_Source], chunk_bytes: int) -> Plan:
        """The plan for these sources into our layout, reused while neither side's layout
        nor slabs changed (the manifests' cache keys cover the sources' fingerprint and
        slab generation; our layout object is compared by identity)."""
        layout = self.layout
        key = (tuple((s.endpoint, s.manifest.cache_key) for s in srcs), chunk_bytes)
        cached = self._plan_cache
        if cached is not None and cached[0] is layout and cached[1] == key:
            return cached[2]
        plan = build_plan(
            [s.manifest.tensors for s in srcs],
            layout.placements,
            chunk_bytes=chunk_bytes,
            source_names=[s.endpoint for s in srcs],
        )
        self._plan_cache = (layout, key, plan)
        self._prep_cache.clear()
        return plan

    def _prepare(
        self, srcs: list[_Source], plan: Plan, slabs: list[Any]
    ) -> tuple[list[Any], dict[tuple[str, int], list[Segment]]]:
        """Prepared READs into `slabs` (active or standby set), and the plan segments
        each handle carries, keyed by (peer endpoint, handle index)."""
        local_slabs = [s.info for s in slabs]
        local_mem = "VRAM" if self.config.memory == "cuda" else "DRAM"
        out = []
        members: dict[tuple[str, int], list[Segment]] = {}
        local_addrs = tuple((s.index, s.addr, s.nbytes, s.device_id) for s in local_slabs)
        for k, src in enumerate(srcs):
            # Descriptor arrays, groups and digest are pure functions of the plan, the
            # source's slabs (manifest cache key) and our slab addresses: built once.
            ck = (id(plan), k, src.endpoint, src.manifest.cache_key, self._generation, local_addrs)
            hit = self._prep_cache.get(ck)
            if hit is None or hit[0] is not plan:
                segs = plan.for_source(k)
                if not segs:
                    continue
                local = descriptor_arrays(
                    [(g.dst_slab, g.dst_offset, g.nbytes) for g in segs], local_slabs
                )
                remote = descriptor_arrays(
                    [(g.src_slab, g.src_offset, g.nbytes) for g in segs], list(src.manifest.slabs)
                )
                n = len(segs)
                per = -(-n // MAX_HANDLES_PER_PEER)
                groups = [list(range(i, min(n, i + per))) for i in range(0, n, per)]
                part = {(src.endpoint, g): [segs[i] for i in idx] for g, idx in enumerate(groups)}
                digest = hash((tuple(segs), self._generation, local_addrs))
                key = (src.manifest.cache_key, self._generation, digest)
                if len(self._prep_cache) >= 16:
                    self._prep_cache.clear()
                hit = (plan, local, remote, groups, part, key)
                self._prep_cache[ck] = hit
            _, local, remote, groups, part, key = hit
            members.update(part)
            remote_mem = src.manifest.slabs[0].memory if src.manifest.slabs else "DRAM"
            out.append(
                self.engine.prepare(
                    src.endpoint,
                    key,
                    functools.partial(_metadata_of, src.manifest),
                    local,
                    remote,
                    local_mem=local_mem,
                    remote_mem=remote_mem,
                    groups=groups,
                )
            )
        return out, members

    def _standby_slabs(self) -> list[Any]:
        """The second slab set (allocated and registered on first use, then kept)."""
        with self._lock:
            if not self._standby:
                self._standby, self._standby_reg, a_s, r_s = self._allocate(self.layout)
                log.info(
                    "standby slab set allocated in %.1f ms, registered in %.1f ms",
                    a_s * 1e3,
                    r_s * 1e3,
                )
            return list(self._standby)

    def _swap(self, version: str) -> None:
        """The standby set holds `version`: make it the active set (what the engine maps
        and peers read) under a new generation, and serve it."""
        with self._lock:
            self._slabs, self._standby = self._standby, self._slabs
            self._reg, self._standby_reg = self._standby_reg, self._reg
            self._generation += 1
            self.publish(version)

    def _track(self, tracker: Any) -> None:
        self._tracker = tracker

    def relay_status(self, after_bytes: int = 0, wait_s: float = 0.0) -> dict[str, Any]:
        """Progress of the last single-buffer pull (RelayStatus RPC), plus our layout;
        with `wait_s`, first wait until more than `after_bytes` of it landed."""
        t = self._tracker
        if wait_s > 0 and t is not None:
            t.wait_beyond(after_bytes, min(wait_s, 1.0))
        with self._lock:
            info = self.version_info()
            t = self._tracker
            snap = t.snapshot() if t is not None else {"state": "Idle"}
            return {**snap, "fingerprint": info["fingerprint"], "generation": info["generation"]}

    def _mark_failed_pull(self) -> None:
        """Our slabs hold a partial pull: serve no version until the next success."""
        with self._lock:
            self._version = ""
            self._epoch += 2 - self._epoch % 2
            self._write_header()


def _metadata_of(manifest: Manifest) -> bytes:
    return manifest.nixl_metadata


__all__ = ["Agent", "AgentConfig", "PullResult", "PeerUnavailable"]
