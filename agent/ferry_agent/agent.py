"""The Agent: a pod's sidecar, one process serving every GPU of its pod.

It holds one RankAgent per local rank (rank.py: a GPU's slabs, NIXL agents on that
GPU's NICs, version state, peers, plans, engine handshake) and what the pod shares:
the gRPC server peers call (every request names the local rank it is for), the
engine's control socket (each engine worker connects with its local rank and sees
only its GPU's slabs), metrics and health, and the credential peers present.

Why one process and not one per GPU: NIXL's UCX contexts read their NICs when they
are created, so each rank's NIXL agents are created with that GPU's NICs set for
that moment (transport.py); one process then keeps one port, one Lease and one
control socket per pod. In host memory the ranks are simulated (each its own shm
slabs and NIXL agents), which is how multi-rank pods are tested on CPUs.

Programmatic use (what `ferry agent run`, the benches and the dev harness do):

    agent = Agent(AgentConfig(pod="w-0", token="...", ranks=2)).start()
    agent.rank(0).declare(specs)          # or let the engine declare via ferry_agent.client
    agent.rank(0).publish("step-100")     # source side
    agent.pull(PullRequest(("10.0.0.5:7470",), rank=1))  # target side, local rank 1
"""

from __future__ import annotations

import logging
import os
import secrets
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .auth import PeerTls
from .control import ControlServer
from .cycle import PullResult
from .follow import Follower, FollowSpec, Outcome, with_name
from .metrics import AgentMetrics, MetricsServer
from .rank import RankAgent
from .request import PullRequest, SourceAddress
from .slabs import reap_stale
from .transport import DEFAULT_POST_THREADS, DEFAULT_PROGRESS_DELAY_US

log = logging.getLogger(__name__)

# 64 MiB chunks: 16 descriptors for 1 GiB, enough to keep several READs in flight.
DEFAULT_CHUNK = 64 << 20
MAX_RANKS = 64


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
    # CUDA ordinals of the local ranks, in local-rank order (cuda); host memory simulates
    # len(devices) ranks. Empty: one rank on device 0.
    devices: tuple[int, ...] = field(default_factory=tuple)
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
    same_gpu: str = "ipc"  # ipc | nixl: how a source on our own GPU is pulled from (ipc.py)
    max_slab_bytes: int | None = None  # slab bytes held at most; None: bounds.py default, 0: none
    # content digests of every version the engine publishes (digests.py); off: targets
    # that verify refuse our versions (DigestsUnavailable)
    digests: bool = True

    def __post_init__(self) -> None:
        self.devices = tuple(int(d) for d in self.devices) or (0,)
        if not 1 <= len(self.devices) <= MAX_RANKS:
            raise ValueError(f"an agent serves 1..{MAX_RANKS} local ranks, not {len(self.devices)}")
        if self.memory == "cuda" and len(set(self.devices)) != len(self.devices):
            raise ValueError(f"devices {list(self.devices)}: each local rank needs its own GPU")

    @property
    def ranks(self) -> int:
        return len(self.devices)


class Agent:
    """`tls`: cluster mode, peers authenticate each other by pod certificate (auth.py);
    without it, by the shared token (standalone)."""

    def __init__(self, config: AgentConfig, tls: PeerTls | None = None):
        self.config = config
        self.tls = tls
        self.metrics = AgentMetrics()
        if tls is None and config.token is None and config.token_file is None:
            raise ValueError(
                "an agent needs a token or token_file (or mTLS): peers must authenticate"
            )
        self._token_file = None
        if config.token_file:
            from .auth import TokenFile

            self._token_file = TokenFile(config.token_file)
        # UCX splits a CMA READ into 512 KiB process_vm_readv calls by default; 64 MiB
        # pieces measured ~20% faster here. A value set by the operator wins.
        os.environ.setdefault("UCX_CMA_SEG_SIZE", "64m")
        start = secrets.token_hex(4)
        self.name = f"{config.namespace}.{config.pod}.{start}"
        if config.memory == "host":
            stale = reap_stale(f"{config.shm_prefix}-{config.pod}")
            if stale:
                log.warning(
                    "removed %d slabs left by a dead agent of this pod: %s", len(stale), stale
                )
        self.ranks: list[RankAgent] = []
        try:
            for r, device in enumerate(config.devices):
                name = self.name if r == 0 else f"{self.name}.r{r}"  # NIXL names are unique
                self.ranks.append(
                    RankAgent(config, r, device, self.token, self.metrics, name, start, tls=tls)
                )
        except BaseException:
            for rank in self.ranks:
                rank.close()
            raise
        self.server: Any = None
        self.control: ControlServer | None = None
        self.metrics_server: MetricsServer | None = None
        self._extra_servicers: list[tuple[Any, Any]] = []
        self.startup_gates: list[Callable[[], bool]] = []
        self.follows: dict[str, Follower] = {}  # this pod's ranks following sources, by name
        self._follow_lock = threading.Lock()

    def rank(self, r: int) -> RankAgent:
        """Local rank `r` (a typed error names the valid ones)."""
        from .errors import BadRequest

        if not 0 <= r < len(self.ranks):
            raise BadRequest(
                f"local rank {r} out of range: this agent serves 0..{len(self.ranks) - 1}", rank=r
            )
        return self.ranks[r]

    # -- lifecycle ----------------------------------------------------------------
    def token(self) -> str:
        """The shared token (token mode); empty in mTLS mode, where none is sent to anyone."""
        if self.tls is not None:
            return ""
        if self._token_file:
            return self._token_file.get()
        return "" if self.config.token is None else str(self.config.token)

    def add_startup_gate(self, gate: Callable[[], bool]) -> None:
        """A check that must pass before /startupz does (e.g. caches installed or given up)."""
        self.startup_gates.append(gate)

    def add_servicer(self, add_fn: Any, servicer: Any) -> None:
        """Serve another gRPC service (same port, same token check); call before start()."""
        self._extra_servicers.append((add_fn, servicer))

    def start(self) -> Agent:
        from .server import AgentServer

        self.server = AgentServer(
            self, self.config.grpc_host, self.config.grpc_port, self.token, tls=self.tls
        )
        for add_fn, servicer in self._extra_servicers:
            self.server.add_servicer(add_fn, servicer)
        self.server.start()
        if self.config.control_socket:
            from .engine_requests import handle_request

            self.control = ControlServer(
                self.config.control_socket,
                lambda op, msg: handle_request(self, op, msg),
                lambda r: self.rank(r).handshake,
            ).start()
        if self.config.metrics_port is not None:
            self.metrics_server = MetricsServer(
                self.metrics,
                self.config.metrics_port,
                ready=lambda: all(r.holds_version for r in self.ranks),
                started=lambda: all(gate() for gate in self.startup_gates),
            ).start()
        return self

    @property
    def endpoint(self) -> str:
        port = self.server.port if self.server else self.config.grpc_port
        return f"{self.config.pod_ip}:{port}"

    def close(self) -> None:
        for name in list(self.follows):
            self.unfollow(name)
        if self.control:
            self.control.stop()
        if self.server:
            self.server.stop()
        if self.metrics_server:
            self.metrics_server.stop()
        for rank in self.ranks:
            rank.close()

    # -- the pod's ranks -------------------------------------------------------------
    @property
    def state(self) -> str:
        """The least ready of the ranks' states
        (Failed < Empty < NoVersion < Declared < Writing < Pulling < Ready)."""
        states = [r.state for r in self.ranks]
        for worst in ("Failed", "Empty", "NoVersion", "Declared", "Writing", "Pulling"):
            if worst in states:
                return worst
        return states[0]

    def pull(
        self,
        request: PullRequest,
        *,
        cancel: Any = None,
        progress: Callable[[int], None] | None = None,
    ) -> PullResult:
        """Pull into local rank `request.rank` (see RankAgent.pull)."""
        return self.rank(request.rank).pull(request, cancel=cancel, progress=progress)

    # -- continuous refit (ferry_agent.follow) ------------------------------------------
    def follow(
        self, spec: FollowSpec, on_outcome: Callable[[Outcome], None] | None = None
    ) -> Follower:
        """Keep local rank `spec.rank` on the newest version of `spec.source`. A follow of
        the same name with another spec replaces it; the same spec is kept as is."""
        from .peer import AgentClient

        spec = with_name(spec, self.config.pod)
        self.rank(spec.rank)  # a typed error for a rank we do not have
        with self._follow_lock:
            cur = self.follows.get(spec.name)
            if cur is not None and cur.spec == spec:
                return cur
            if cur is not None:
                log.info("follow %s changed: was %s", spec.name, cur.spec)
                self._stop_follow(cur)
            addr = SourceAddress.parse(spec.source)
            rank = self.rank(spec.rank)
            f = Follower(
                spec,
                pull=lambda req, cancel: self.pull(req, cancel=cancel),
                client=AgentClient(
                    addr.endpoint, self.token(), timeout=10.0, tls=self.tls, expect=addr.pod
                ),
                serving=lambda: rank.version_info()["version"],
                on_outcome=on_outcome,
                state=cur.state if cur is not None else None,
            )
            self.follows[spec.name] = f.start()
            log.info(
                "following %s as %s (upstream %s)", spec.source, spec.name, spec.upstream or "none"
            )
            return f

    def unfollow(self, name: str) -> bool:
        """Stop following (the source drops us from its board); False if not following."""
        with self._follow_lock:
            f = self.follows.pop(name, None)
            if f is None:
                return False
            self._stop_follow(f)
            return True

    @staticmethod
    def _stop_follow(f: Follower) -> None:
        f.stop()


__all__ = ["Agent", "AgentConfig", "PullRequest", "PullResult", "RankAgent"]
