"""What an inference engine or trainer imports to share weights with its local agent.

    from ferry_agent.client import EngineClient
    c = EngineClient.connect()                    # $FERRY_AGENT_SOCKET
    w = c.declare({"layers.0.wq": ("bfloat16", (4096, 4096)), ...})  # torch views into slabs
    with c.writing("step-42"):                    # source: write, then publish
        w["layers.0.wq"].copy_(new)
    refit = c.wait_refit()                        # target: the agent wants to pull
    stop_reading(); refit.ack(); version, ok = refit.wait_done(); start_reading()

Host mode maps the agent's POSIX shm slabs; CUDA mode opens its CUDA IPC handles.
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


class EngineClient:
    def __init__(self, path: str, *, timeout: float = 120.0):
        self.path = path
        self.timeout = timeout
        self._conn = _Conn(path, timeout)
        self._lock = threading.Lock()
        self._events: _Conn | None = None
        self._slabs: list[Any] = []
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
            send(self._conn.sock, {"op": op, **fields})
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
        from .views import tensor_views

        if reply["generation"] == self.generation:
            return self.tensors
        self._close_slabs()
        if reply["memory"] == "cuda":
            from .cuda import CudaSlab

            self._slabs = [
                CudaSlab.attach(s["index"], s["handle"], s["nbytes"], s["device_id"])
                for s in reply["slabs"]
            ]
        else:
            from .slabs import HostSlab

            self._slabs = [
                HostSlab.attach(s["index"], s["handle"], s["nbytes"]) for s in reply["slabs"]
            ]
        self.placements = [Placement.from_dict(t) for t in reply["tensors"]]
        self.fingerprint, self.generation = reply["fingerprint"], reply["generation"]
        self.tensors = tensor_views(self._slabs, self.placements)
        return self.tensors

    # -- source side ---------------------------------------------------------------------
    def begin_write(self) -> None:
        self.request("begin_write")

    def publish(self, version: str) -> int:
        return int(self.request("publish", version=version)["epoch"])

    @contextlib.contextmanager
    def writing(self, version: str) -> Iterator[dict[str, Any]]:
        """Peers never pull a half-written set: begin_write, yield views, publish."""
        self.begin_write()
        yield self.tensors
        self.publish(version)

    def status(self) -> dict[str, Any]:
        return self.request("status")

    # -- target side: refit handshake ------------------------------------------------------
    def subscribe(self) -> None:
        """Register as an engine that must be paused before pulls (done by wait_refit)."""
        if self._events is None:
            conn = _Conn(self.path, self.timeout)
            send(conn.sock, {"op": "subscribe"})
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
        for s in self._slabs:
            s.close()
        self._slabs = []

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


__all__ = ["EngineClient", "Refit", "FerryError", "TensorSpec"]
