"""What an inference engine or trainer imports to share weights with its local agent.

    from ferry_agent.client import EngineClient
    c = EngineClient.connect()                    # $FERRY_AGENT_SOCKET
    w = c.declare({"layers.0.wq": ("bfloat16", (4096, 4096)), ...})  # torch views into slabs
    with c.writing("step-42"):                    # source: write, then publish
        w["layers.0.wq"].copy_(new)
    refit = c.wait_refit()                        # target: the agent wants to pull
    stop_reading(); refit.ack(); version, ok = refit.wait_done(); start_reading()

Host mode maps the agent's POSIX shm slabs; CUDA mode opens its CUDA IPC handles.

Without torch (an engine image that carries only numpy, e.g. the node tier's): in host
mode `EngineClient.connect(views="bytes")` returns each tensor as a writable uint8 numpy
view of its bytes in the slab instead of a torch tensor; nothing imports torch.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .control import recv, send
from .errors import FerryError, from_reason
from .layout import Placement, TensorSpec

ENV_SOCKET = "FERRY_AGENT_SOCKET"
ENV_RANK = "FERRY_AGENT_RANK"
VIEWS = ("torch", "bytes")


class _Conn:
    def __init__(self, path: str, timeout: float | None):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(path)
        self.reader = self.sock.makefile("rb")

    def close(self) -> None:
        self.reader.close()
        self.sock.close()


def _raise_if_error(reply: dict[str, Any] | None) -> dict[str, Any]:
    if reply is None:
        raise ConnectionError("agent closed the control connection")
    if not reply.get("ok"):
        fields = {k: v for k, v in reply.items() if k not in ("ok", "reason", "message")}
        raise from_reason(str(reply.get("reason")), str(reply.get("message")), **fields)
    return reply


@dataclass
class Refit:
    """A pause request from the agent; ack() once the engine stopped reading its weights."""

    id: int
    version: str
    _conn: _Conn
    generation: int | None = None  # set by wait_done when the agent swapped slab sets

    def ack(self) -> None:
        send(self._conn.sock, {"op": "ack", "id": self.id})

    def wait_done(self, timeout: float | None = None) -> tuple[str, bool]:
        """Block until the agent resumes us: (version now in the slabs, pull succeeded).

        After a double-buffer swap `generation` is set: the weights now live in the
        other slab set, so call EngineClient.attach() before reading again."""
        self._conn.sock.settimeout(timeout)
        msg = recv(self._conn.reader)
        if msg is None or msg.get("event") != "resume":
            raise ConnectionError(f"agent ended the refit handshake unexpectedly: {msg}")
        if msg.get("generation") is not None:
            self.generation = int(msg["generation"])
        return str(msg.get("version", "")), bool(msg.get("ok"))


@dataclass(frozen=True)
class TargetResult:
    """One target's outcome for a published version (publish_and_wait)."""

    name: str
    ok: bool
    version: str  # what it serves now
    reason: str = ""
    message: str = ""
    seconds: float = 0.0  # notice to served, on the target
    bytes: int = 0
    transport: str = ""

    @classmethod
    def from_dict(cls, name: str, d: dict[str, Any]) -> TargetResult:
        return cls(
            name,
            bool(d["ok"]),
            str(d.get("version", "")),
            str(d.get("reason", "")),
            str(d.get("message", "")),
            float(d.get("seconds", 0.0)),
            int(d.get("bytes", 0)),
            str(d.get("transport", "")),
        )


@dataclass(frozen=True)
class PublishResult:
    version: str
    epoch: int
    targets: dict[str, TargetResult]

    @property
    def ok(self) -> bool:
        """Every target serves the version (False too when no target follows)."""
        return bool(self.targets) and all(
            t.ok and t.version == self.version for t in self.targets.values()
        )

    @property
    def failed(self) -> dict[str, TargetResult]:
        return {n: t for n, t in self.targets.items() if not (t.ok and t.version == self.version)}


class EngineClient:
    """One engine worker's connection to its pod's agent. `rank` is the local rank (GPU)
    the worker serves: it sees that rank's slabs and is paused for that rank's pulls
    (default: $FERRY_AGENT_RANK, else 0). `views`: "torch" (tensors of each dtype/shape)
    or "bytes" (host memory only: a uint8 numpy array of each tensor's bytes, no torch)."""

    def __init__(
        self, path: str, *, timeout: float = 120.0, rank: int | None = None, views: str = "torch"
    ):
        if views not in VIEWS:
            raise ValueError(f"views={views!r}: use one of {', '.join(VIEWS)}")
        self.views = views
        self.path = path
        self.timeout = timeout
        self.rank = int(os.environ.get(ENV_RANK, "0")) if rank is None else int(rank)
        self._conn = _Conn(path, timeout)
        self._lock = threading.Lock()
        self._events: _Conn | None = None
        self.slabs: list[Any] = []  # the agent's slabs mapped here (HostSlab / CudaSlab)
        self.tensors: dict[str, Any] = {}
        self.placements: list[Placement] = []
        self.fingerprint = ""
        self.generation = -1

    @classmethod
    def connect(cls, path: str | None = None, **kw: Any) -> EngineClient:
        path = path or os.environ.get(ENV_SOCKET)
        if not path:
            raise ValueError(f"no agent socket: pass a path or set {ENV_SOCKET}")
        return cls(path, **kw)

    def request(self, op: str, **fields: Any) -> dict[str, Any]:
        with self._lock:
            send(self._conn.sock, {"op": op, "rank": self.rank, **fields})
            return _raise_if_error(recv(self._conn.reader))

    # -- layout -----------------------------------------------------------------------
    def declare(self, tensors: Sequence[TensorSpec] | Mapping[str, Any]) -> dict[str, Any]:
        """Declare names/dtypes/shapes (specs, {name: (dtype, shape)} or {name: torch.Tensor});
        returns {name: tensor view into the agent's slabs}."""
        specs = _to_specs(tensors)
        reply = self.request("declare", tensors=[s.to_dict() for s in specs])
        return self._map(reply)

    def attach(self) -> dict[str, Any]:
        """Views of whatever layout the agent holds (e.g. adopted from a source by a pull)."""
        return self._map(self.request("layout"))

    def _map(self, reply: dict[str, Any]) -> dict[str, Any]:
        if reply["generation"] == self.generation:
            return self.tensors
        self._close_slabs()
        if reply["memory"] == "cuda" and self.views == "bytes":
            raise ValueError(
                "views='bytes' maps host memory only; this agent's slabs are CUDA "
                "(memory: cuda): connect with views='torch'"
            )
        if reply["memory"] == "cuda":
            from .cuda import CudaSlab

            self.slabs = [
                CudaSlab.attach(s["index"], s["handle"], s["nbytes"], s["device_id"])
                for s in reply["slabs"]
            ]
        else:
            from .slabs import HostSlab

            self.slabs = [
                HostSlab.attach(s["index"], s["handle"], s["nbytes"]) for s in reply["slabs"]
            ]
        self.placements = [Placement.from_dict(t) for t in reply["tensors"]]
        self.fingerprint, self.generation = reply["fingerprint"], reply["generation"]
        if self.views == "bytes":
            self.tensors = {
                p.name: self.slabs[p.slab].view(p.offset, p.nbytes) for p in self.placements
            }
        else:
            from .views import tensor_views

            self.tensors = tensor_views(self.slabs, self.placements)
        return self.tensors

    # -- source side ---------------------------------------------------------------------
    def begin_write(self) -> None:
        self.request("begin_write")

    def publish(self, version: str) -> int:
        return int(self.request("publish", version=version)["epoch"])

    def publish_and_wait(
        self,
        version: str,
        timeout: float = 30.0,
        *,
        followers: Sequence[str] = (),
        at_least: int = 0,
    ) -> PublishResult:
        """Publish, then block until the targets following this source serve `version`
        (or failed to, or `timeout` passed): the trainer waits without the apiserver.

        Whom: `followers` by name, else every subscribed follower (at least `at_least`
        of them). Each target's outcome is in the result; nothing raises for a target
        that failed or did not report (result.ok is False, result.failed names them)."""
        sock_timeout = self._conn.sock.gettimeout()
        self._conn.sock.settimeout(timeout + self.timeout)
        try:
            reply = self.request(
                "publish",
                version=version,
                wait_s=timeout,
                followers=list(followers),
                at_least=at_least,
            )
        finally:
            self._conn.sock.settimeout(sock_timeout)
        targets = {f: TargetResult.from_dict(f, d) for f, d in reply["targets"].items()}
        return PublishResult(version, int(reply["epoch"]), targets)

    def followers(self) -> dict[str, Any]:
        """Source side: the targets following us and what each reported last."""
        return self.request("followers")

    # -- target side: continuous refit ---------------------------------------------------
    def follow(self, source: str, upstream: str | None = None, **options: Any) -> str:
        """Ask our agent to keep our rank on `source`'s newest version (follow.FollowSpec's
        fields as options); returns the follower's name. The control plane does this
        from a RefitJob with `version: follow`; this is the standalone way."""
        spec = {"source": source, "upstream": upstream, **options}
        return str(self.request("follow", spec=spec)["name"])

    def unfollow(self, name: str | None = None) -> bool:
        return bool(self.request("unfollow", name=name)["stopped"])

    def following(self) -> dict[str, Any]:
        return dict(self.request("following")["follows"])

    @contextlib.contextmanager
    def writing(self, version: str) -> Iterator[dict[str, Any]]:
        """Peers never pull a half-written set: begin_write, yield views, publish."""
        self.begin_write()
        yield self.tensors
        self.publish(version)

    def status(self) -> dict[str, Any]:
        return self.request("status")

    def pull(self, sources: Sequence[str], **options: Any) -> dict[str, Any]:
        """Ask our agent to pull into our rank (request.PullRequest's fields as options):
        the way to ask in cluster mode, where the Pull RPC is not served to peers.
        Returns version, bytes, seconds, attempts, transport; raises the typed error."""
        timeout = float(options.get("timeout_s", 60.0))
        sock_timeout = self._conn.sock.gettimeout()
        self._conn.sock.settimeout(timeout + self.timeout)
        try:
            return self.request("pull", request={"sources": list(sources), **options})
        finally:
            self._conn.sock.settimeout(sock_timeout)

    # -- target side: refit handshake ------------------------------------------------------
    def subscribe(self) -> None:
        """Register as an engine that must be paused before pulls (done by wait_refit)."""
        if self._events is None:
            conn = _Conn(self.path, self.timeout)
            send(conn.sock, {"op": "subscribe", "rank": self.rank})
            _raise_if_error(recv(conn.reader))
            self._events = conn

    def wait_refit(self, timeout: float | None = None) -> Refit | None:
        """Block until the agent asks us to pause (None on timeout)."""
        self.subscribe()
        assert self._events is not None
        self._events.sock.settimeout(timeout)
        try:
            msg = recv(self._events.reader)
        except TimeoutError:
            # A buffered reader is unusable after a timeout; events are single
            # small lines, so a fresh reader loses nothing.
            self._events.reader = self._events.sock.makefile("rb")
            self._events.sock.settimeout(self.timeout)
            return None
        if msg is None or msg.get("event") != "pause":
            raise ConnectionError(f"unexpected event from agent: {msg}")
        self._events.sock.settimeout(self.timeout)
        return Refit(int(msg["id"]), str(msg.get("version", "")), self._events)

    def _close_slabs(self) -> None:
        self.tensors = {}
        for s in self.slabs:
            s.close()
        self.slabs = []

    def close(self) -> None:
        if self._events is not None:
            self._events.close()
            self._events = None
        self._conn.close()
        self._close_slabs()

    def __enter__(self) -> EngineClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _to_specs(tensors: Sequence[TensorSpec] | Mapping[str, Any]) -> list[TensorSpec]:
    if isinstance(tensors, Mapping):
        out = []
        for name, v in tensors.items():
            if hasattr(v, "dtype") and hasattr(v, "shape"):  # a torch tensor
                out.append(TensorSpec(name, str(v.dtype).removeprefix("torch."), tuple(v.shape)))
            else:
                dtype, shape = v
                out.append(TensorSpec(name, str(dtype), tuple(shape)))
        return out
    return [s if isinstance(s, TensorSpec) else TensorSpec(*s) for s in tensors]


__all__ = ["EngineClient", "FerryError", "PublishResult", "Refit", "TargetResult", "TensorSpec"]
