"""One local rank of a pod's agent: the data plane of one GPU (or, in host memory, one
simulated rank).

It wires the components, each with a public API (none reaches into another's state):

    transport  NixlTransport: the NIXL agents (lanes) of this GPU, with this GPU's NICs
    store      SlabStore: the weight memory (slab sets, layout, generation, swap)
    versions   VersionState: the served version and the seqlock peers fence with
    peers      PeerCache: sources' clients, manifests, version words, the fence
    plans      PlanCache: plans and prepared READs kept across refit cycles
    ipc        CudaIpcCopier: same-GPU sources copied through CUDA IPC (cuda agents)
    handshake  EngineHandshake: pause/ack/resume with this rank's engine worker
    relays     RelayBoard: the current pull's progress, for downstream relay links
    followers  FollowerBoard: targets following this rank's versions (ferry_agent.follow)

The pod's Agent (agent.py) holds one RankAgent per local rank and the servers.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from . import cycle
from . import rails as rails_mod
from .bounds import default_max_slab_bytes
from .control import EngineHandshake
from .cycle import Parts, PullContext, PullResult
from .digests import DigestBook, Digests, of_version
from .errors import FerryError
from .fallback import FallbackWarnings
from .fallback import Peer as FallbackPeer
from .follow import FollowerBoard, Notice
from .ipc import CudaIpcCopier, host_id, locality
from .layout import Layout, TensorSpec
from .manifest import Manifest
from .memory import nixl_memory
from .peers import PeerCache
from .plans import PlanCache
from .progress import RelayBoard, RelayStatus
from .request import PullRequest
from .slabs import slab_prefix
from .store import SlabStore
from .transport import DEFAULT_HOST_LANES, NixlTransport
from .version import PAGE, VersionHeader, VersionState, is_writing

if TYPE_CHECKING:
    from .agent import AgentConfig
    from .auth import PeerTls
    from .metrics import AgentMetrics

log = logging.getLogger(__name__)
# Added to the message of a failed pull that left the slabs holding no version.
NO_VERSION_NOTE = "the slabs hold no version (partly written) until a pull succeeds"


@dataclass(frozen=True)
class StartupTimes:
    """The version headers' allocation and registration at start-up (seconds)."""

    alloc_s: float
    register_s: float


class RankAgent:
    def __init__(
        self,
        config: AgentConfig,
        rank: int,
        device: int,
        token: Callable[[], str],
        metrics: AgentMetrics,
        name: str,
        start: str,
        tls: PeerTls | None = None,
    ):
        """`start`: random per agent start; with the pod it names this rank's shm slabs.
        `tls`: cluster mode, peers are dialled over mTLS (auth.py)."""
        self.config, self.rank, self.device, self.metrics, self.name = (
            config,
            rank,
            device,
            metrics,
            name,
        )
        cuda = config.memory == "cuda"
        # UCX reads UCX_NET_DEVICES when NIXL creates its UCX contexts: each rank's NIXL
        # agents get the NICs closest to its GPU (rails.py), set around their creation.
        env = dict(os.environ)
        self.rails = rails_mod.apply(
            env, config.rails, gpu=device if cuda else None, sysfs_root=config.sysfs_root
        )
        owner = f"{config.shm_prefix}-{config.pod}"
        self._header_prefix = slab_prefix(owner, f"r{rank}h", start)
        self.transport = NixlTransport(
            name,
            lanes=config.lanes or (DEFAULT_HOST_LANES if not cuda else 1),
            num_threads=config.nixl_threads,
            post_threads=config.post_threads,
            progress_delay_us=config.progress_delay_us,
            thread_init=self._cuda_thread_init if cuda else None,
            net_devices=env.get(rails_mod.ENV, "") if config.rails != "off" else None,
        )
        self.handshake = EngineHandshake()
        self._pull_lock = threading.Lock()
        self._pulling = False
        state_lock = threading.RLock()  # slabs and versions change together
        self.store = SlabStore(
            self.transport,
            memory=config.memory,
            device=device,
            prefix=slab_prefix(owner, f"r{rank}", start),
            scratch_prefix=slab_prefix(owner, f"r{rank}x", start),
            slab_bytes=config.slab_bytes,
            lock=state_lock,
            max_bytes=default_max_slab_bytes(config.memory)
            if config.max_slab_bytes is None
            else config.max_slab_bytes,
        )
        self.startup = self._headers()
        self.versions = VersionState(self._header, lambda: self.store.generation, state_lock)
        self.peers = PeerCache(self.transport, token, self._landing, host=host_id(), tls=tls)
        self.plans = PlanCache(self.transport, self.peers, nixl_memory(config.memory))
        self.relays = RelayBoard()
        self.followers = FollowerBoard()
        # Called with (version, epoch) after each publish (e.g. the Lease reporter's poke).
        self.on_publish: list[Callable[[str, int], None]] = []
        self.locality = locality(config.memory, device)
        self.digest_book = DigestBook(state_lock, seed=name)
        ipc = CudaIpcCopier(device) if cuda and config.same_gpu == "ipc" else None
        self.parts = Parts(
            self.store,
            self.versions,
            self.peers,
            self.plans,
            self.transport,
            self.handshake,
            self.metrics,
            self.relays,
            config.chunk_bytes,
            config.max_inflight,
            self.locality,
            self.digest_book,
            ipc=ipc,
            fallback=FallbackWarnings(
                FallbackPeer(self.locality.host, self.locality.device, config.memory),
                ipc is not None,
            ),
        )
        self._reshard: Any = None  # the ReshardPull kept across cycles, for one (rank, tp)
        # The reason of the failed pull that left the slabs holding no version ("" when
        # none did, or a version was published since): state NoVersion.
        self._no_version = ""
        self._version_label: tuple[str, str] | None = None
        # (reason, message) of this rank's last failed declare (allocation, registration,
        # a layout too large): state Failed until a declare succeeds.
        self._slab_error: tuple[str, str] | None = None

    def _headers(self) -> StartupTimes:
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
        cfg = self.config
        kind = cfg.memory if cfg.header_memory == "slab" else "host"
        # "host" headers are also a file a same-pod target maps; "slab" headers are read
        # over NIXL only (for host memory too: how the NIXL header path is tested here)
        shm = self._header_prefix if cfg.header_memory == "host" else ""
        self._header = VersionHeader(kind, self.device, shm_prefix=shm)
        self._landing = VersionHeader(kind, self.device)
        self._warmup = None
        if cfg.memory == "cuda" and kind == "host":
            self._warmup = self.store.allocate((PAGE,))  # cuda: no shm name
        t1 = time.perf_counter()
        mem = self._header.memory
        self._header_reg = self.transport.register([self._header.region, self._landing.region], mem)
        t2 = time.perf_counter()
        log.info(
            "start-up: version headers (%s) allocated in %.1f ms, registered in %.1f ms",
            mem,
            (t1 - t0) * 1e3,
            (t2 - t1) * 1e3,
        )
        return StartupTimes(t1 - t0, t2 - t1)

    def _cuda_thread_init(self) -> None:
        from .cuda import set_device

        set_device(self.device)

    def close(self) -> None:
        if self._reshard is not None:
            self._reshard.close()
            self._reshard = None
        if self.parts.ipc is not None:
            self.parts.ipc.close()
        self.peers.close()
        self.transport.close()
        self.relays.forget()
        self.store.close()
        if self._header_reg is not None:
            self.transport.deregister(self._header_reg, 2)
            self._header_reg = None
            self._header.close()
            self._landing.close()
        if self._warmup is not None:
            self._warmup.release(self.transport)
            self._warmup = None

    # -- layout and versions -------------------------------------------------------
    def declare(self, specs: Sequence[TensorSpec]) -> bool:
        """Allocate and register slabs for `specs`; they serve no version yet. Returns
        False when the same layout is already in place (nothing re-allocated)."""
        with self.store.lock:
            try:
                created = self.store.declare(specs)
            except Exception as exc:  # too large, allocation or NIXL registration failed
                self._slab_error = (
                    getattr(exc, "reason", None) or type(exc).__name__,
                    str(exc)[:256],
                )
                log.warning(
                    "local rank %d: declaring %d tensors failed: %s", self.rank, len(specs), exc
                )
                raise
            self._slab_error = None
            if not created:
                return False
            self.relays.forget()
            self.versions.clear()
            self._no_version = ""  # new slabs: empty, not torn
            done = self.store.last_declare
            assert done is not None
            self.metrics.registration_seconds.observe(done.register_s)
            log.info(
                "declared %d tensors, %d slabs, %.1f MiB, allocated in %.3f ms, registered in %.3f ms",
                len(specs),
                len(done.slabs),
                self.store.layout.nbytes / 2**20,
                done.alloc_s * 1e3,
                done.register_s * 1e3,
            )
            return True

    @property
    def layout(self) -> Layout:
        return self.store.layout

    @property
    def slabs(self) -> list[Any]:
        return self.store.slabs

    def views(self) -> dict[str, Any]:
        return self.store.views()

    def begin_write(self) -> int:
        """The engine writes the slabs (odd epoch): peers will not trust a pull meanwhile."""
        return self.versions.begin_write()

    def publish(self, version: str) -> int:
        """New weights are in place: serve them as `version` (even epoch), with their
        content digests, computed first, while no peer trusts the bytes yet (digests.py;
        host memory ~104 ms/GiB here)."""
        layout = self.store.layout  # raises NotDeclared
        if not version:
            raise ValueError("version must not be empty")
        record = None
        if self.config.digests:
            record = of_version(version, self.store.slabs, layout.placements, self.config.memory)
        with self.store.lock:
            self.digest_book.adopt(record)
            epoch = self.versions.publish(version)
            self._no_version = ""
        label = (version, self.store.layout.fingerprint)
        if label != self._version_label:  # a refit to the same labels changes no series
            self.metrics.version_info.clear()
            self.metrics.version_info.labels(*label).set(1)
            self._version_label = label
        self.followers.notify(Notice(version, epoch, label[1], time.time()))
        for hook in self.on_publish:
            try:
                hook(version, epoch)
            except Exception:  # a hook never fails a publish
                log.exception("publish hook failed")
        return epoch

    def digests(self, version: str) -> Digests | None:
        """The content digests of `version`, while we serve it (GetDigests)."""

        def serving() -> bool:
            with self.store.lock:
                return (
                    bool(version) and self.versions.version == version and not self.versions.writing
                )

        if not serving():
            return None
        got = self.digest_book.get(version)  # a deferred record is fetched outside the lock
        return got if serving() else None

    def version_info(self) -> dict[str, Any]:
        """GetVersion's fields (see ferry_agent.proto)."""
        with self.store.lock:
            snap = self.versions.snapshot()
            return {
                "version": snap.version,
                "epoch": snap.epoch,
                "agent": self.name,
                "fingerprint": self.store.layout.fingerprint if self.store.declared else "",
                "generation": snap.generation,
            }

    def header_info(self) -> dict[str, Any]:
        """VersionInfo's header fields (see ferry_agent.proto)."""
        return {
            "header_addr": self._header.addr,
            "header_nbytes": VersionHeader.NBYTES,
            "header_device": self._header.device_id,
            "header_memory": self._header.memory,
            "nonce": self.versions.nonce,
            "header_shm": self._header.shm_name,
        }

    @property
    def state(self) -> str:
        """Empty | Declared | Ready | Writing (engine) | Pulling (READs into our slabs) |
        NoVersion (a pull failed and the slabs hold no version: `no_version_reason`) |
        Failed (the last declare failed: `slab_error`)."""
        if self._slab_error is not None:
            return "Failed"
        if not self.store.declared:
            return "Empty"
        if is_writing(self.versions.epoch):
            return "Pulling" if self._pulling else "Writing"
        if self.versions.version:
            return "Ready"
        return "NoVersion" if self._no_version else "Declared"

    @property
    def no_version_reason(self) -> str:
        """Why the slabs hold no version (the failed pull's reason), "" unless NoVersion."""
        return self._no_version if self.state == "NoVersion" else ""

    @property
    def slab_error(self) -> tuple[str, str] | None:
        """(reason, message) of the failed declare that left this rank Failed, else None."""
        return self._slab_error

    @property
    def holds_version(self) -> bool:
        """The slabs hold a complete, published version (what /readyz reports)."""
        return self.store.declared and bool(self.versions.version) and not self.versions.writing

    def manifest(self, *, with_metadata: bool = True) -> Manifest:
        with self.store.lock:
            layout = self.store.layout
            snap = self.versions.snapshot()
            return Manifest(
                agent=self.name,
                pod=self.config.pod,
                namespace=self.config.namespace,
                version=snap.version,
                epoch=snap.epoch,
                fingerprint=layout.fingerprint,
                generation=snap.generation,
                memory=self.config.memory,
                tensors=layout.placements,
                slabs=tuple(s.info for s in self.store.slabs),
                nixl_metadata=self.transport.metadata() if with_metadata else b"",
                alignment=layout.alignment,
                host_id=self.locality.host,
                device=self.locality.device,
            )

    def relay_status(self, after_bytes: int = 0, wait_s: float = 0.0) -> tuple[RelayStatus, dict]:
        """The RelayStatus RPC: the current pull's progress, and our layout's identity."""
        status = self.relays.status(after_bytes, wait_s)
        info = self.version_info()
        return status, {"fingerprint": info["fingerprint"], "generation": info["generation"]}

    # -- pulling -------------------------------------------------------------------
    def pull(
        self,
        request: PullRequest,
        *,
        cancel: threading.Event | None = None,
        progress: Callable[[int], None] | None = None,
    ) -> PullResult:
        """Pull `request.version` (None: whatever the sources hold) into our slabs, one
        pull at a time; see cycle.py for the order of steps and what failures leave.

        Raises LayoutMismatch before any byte moves, SourceStale / VersionChanged when
        the sources do not hold (or stop holding) the version, PeerUnavailable,
        TransferTimeout past the request's timeout, Cancelled within ~0.1 s of `cancel`
        being set. progress(bytes): bytes landed so far, from the pulling thread."""
        if self.config.memory == "cuda":
            self._cuda_thread_init()  # gRPC threads prepare VRAM descriptor lists
        with self._pull_lock:
            self._pulling = True
            try:
                ctx = PullContext(request, self.parts, cancel, progress)
                result = cycle.run(self.parts, self._variant(request, ctx), ctx)
                self._no_version = ""
                return result
            except FerryError as exc:
                self.metrics.failures.labels(exc.reason).inc()
                self._after_failure(exc.reason, exc)
                raise
            except Exception:
                self._after_failure("AgentError", None)
                raise
            finally:
                self._pulling = False

    def _after_failure(self, reason: str, exc: FerryError | None) -> None:
        """A failed pull that left the slabs holding no version (it had begun writing
        them, or nothing was pulled before): NoVersion, and the error says so, so that
        whoever reads it (the RefitJob entry, a Pull caller) knows the engine's weights
        are not a version."""
        if not self.store.declared or self.versions.version:
            return
        self._no_version = reason
        if exc is not None and NO_VERSION_NOTE not in exc.message:
            exc.message = f"{exc.message}; {NO_VERSION_NOTE}"
            exc.args = (exc.message,)

    def _variant(self, request: PullRequest, ctx: PullContext) -> cycle.PullVariant:
        from .pull import DirectPull

        if request.reshard is not None:
            return self._reshard_pull(request.reshard.rank, request.reshard.tp).for_sources(
                request.sources
            )
        if request.relay:
            from .relay import RelayPull

            relay = RelayPull(self.parts, request.sources[0])
            if relay.start(ctx):
                return relay
        return DirectPull(self.parts, request.sources, request.double_buffer)

    def _reshard_pull(self, rank: int, tp: int) -> Any:
        """The ReshardPull kept for (rank, tp): its plan, prepared lists and scratch are
        reused across cycles; another (rank, tp) starts over."""
        from .transform.reshard_pull import ReshardPull

        current = self._reshard
        if current is not None and (current.target_rank, current.target_tp) != (rank, tp):
            current.close()
            current = None
        if current is None:
            current = self._reshard = ReshardPull(self.parts, target_rank=rank, target_tp=tp)
        return current
