"""Unix-socket protocol between the agent and its local engine process.

Framing: one JSON object per line. Request connections carry
`{"op": ..., "rank": r}` -> `{"ok": true, ...}` | `{"ok": false, "reason", "message"}`
(`rank`: the local rank, i.e. GPU, the engine worker serves; absent means 0).
A connection that sends `{"op": "subscribe", "rank": r}` becomes the event channel
of rank r's engine worker for the refit handshake:

    agent -> {"event": "pause", "id": N, "version": V}
    engine -> {"op": "ack", "id": N}         (engine no longer reads its weights)
    agent -> {"event": "resume", "id": N, "version": H, "ok": bool}

H is the version the slabs hold after the pull: the new one on success; after a
failure the old one when nothing was written (double buffer), "" when the pull had
begun writing them (single buffer: the weights are torn, nothing may serve them).

Only JSON with typed fields crosses this socket; tensor memory is shared by
name (shm) or CUDA IPC handle, never copied through it.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import select
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .errors import Cancelled, EngineNotQuiesced, FerryError

log = logging.getLogger(__name__)
MAX_LINE = 64 << 20
# How often a pause that waits for acks looks at its cancel event.
CANCEL_POLL_S = 0.05


def send(sock: socket.socket, obj: dict[str, Any]) -> None:
    sock.sendall(json.dumps(obj, separators=(",", ":")).encode() + b"\n")


def recv(reader: Any) -> dict[str, Any] | None:
    line = reader.readline(MAX_LINE)
    if not line:
        return None
    return json.loads(line)


def _peer_closed(sock: socket.socket) -> bool:
    """True once the other end hung up (readable with nothing to read)."""
    r, _, _ = select.select([sock], [], [], 0)
    if not r:
        return False
    try:
        return sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True


def _refit_over(refit: _Refit, stop: threading.Event) -> bool:
    return refit.done or stop.is_set()


@dataclass
class _Refit:
    id: int
    version: str
    acked: set[int] = field(default_factory=set)
    done: bool = False
    ok: bool = False
    generation: int | None = None


class EngineHandshake:
    """The agent side of the pause/ack/resume handshake with its subscribed engines."""

    def __init__(self) -> None:
        self._cv = threading.Condition()
        self._subscribers: set[int] = set()
        self._refit: _Refit | None = None
        self._next_id = 1

    @property
    def subscribers(self) -> int:
        with self._cv:
            return len(self._subscribers)

    def pause(
        self,
        version: str,
        timeout: float,
        cancel: threading.Event | None = None,
        holds: str = "",
    ) -> int | None:
        """Ask every subscribed engine to stop reading; wait for all acks.

        Returns the refit id (None when no engine is subscribed: nothing reads the slabs).
        Raises EngineNotQuiesced when an engine does not acknowledge in time, Cancelled
        when `cancel` is set first (the engine is then resumed with ok=False and `holds`,
        the version the slabs hold now: nothing was written)."""
        deadline = time.monotonic() + timeout
        with self._cv:
            if not self._subscribers:
                return None
            refit = _Refit(self._next_id, version)
            self._next_id += 1
            self._refit = refit
            self._cv.notify_all()
            while not self._subscribers <= refit.acked:
                left = deadline - time.monotonic()
                if left <= 0:
                    missing = len(self._subscribers - refit.acked)
                    refit.done, refit.ok, refit.version = True, False, holds
                    self._cv.notify_all()
                    raise EngineNotQuiesced(
                        f"{missing} engine(s) did not acknowledge the pause within {timeout:g}s",
                        missing=missing,
                        timeout_s=timeout,
                    )
                if cancel is not None and cancel.is_set():
                    refit.done, refit.ok, refit.version = True, False, holds
                    self._cv.notify_all()
                    raise Cancelled("cancelled while waiting for the engine to pause")
                self._cv.wait(min(left, CANCEL_POLL_S))
            return refit.id

    def resume(
        self, refit_id: int | None, version: str, ok: bool, generation: int | None = None
    ) -> None:
        """End the refit. `version`: what the slabs hold now ("" none: see the module
        doc). `generation` is the slab generation the engine must map now (a
        double-buffer swap changes it: the engine calls attach() again)."""
        if refit_id is None:
            return
        with self._cv:
            if self._refit is not None and self._refit.id == refit_id:
                self._refit.version, self._refit.ok, self._refit.done = version, ok, True
                self._refit.generation = generation
                self._cv.notify_all()

    def _woken(self, seen: int, stop: threading.Event) -> bool:
        r = self._refit
        return (r is not None and r.id != seen and not r.done) or stop.is_set()

    def serve_subscriber(
        self, conn_id: int, sock: socket.socket, reader: Any, stop: threading.Event
    ) -> None:
        """Run one engine's event channel until it disconnects or the agent stops."""
        with self._cv:
            self._subscribers.add(conn_id)
            seen = self._refit.id if self._refit else 0
        try:
            send(sock, {"ok": True, "subscribed": True})
            while not stop.is_set():
                with self._cv:
                    self._cv.wait_for(functools.partial(self._woken, seen, stop), 0.1)
                    refit = self._refit
                    if refit is None or refit.id == seen or refit.done:
                        refit = None
                if refit is None:
                    if _peer_closed(sock):
                        return
                    continue
                seen = refit.id
                send(sock, {"event": "pause", "id": refit.id, "version": refit.version})
                msg = recv(reader)
                if msg is None:
                    return
                if msg.get("op") == "ack" and msg.get("id") == refit.id:
                    with self._cv:
                        refit.acked.add(conn_id)
                        self._cv.notify_all()
                        self._cv.wait_for(functools.partial(_refit_over, refit, stop))
                resume: dict[str, Any] = {"event": "resume", "id": refit.id}
                resume |= {"version": refit.version, "ok": refit.ok}
                if refit.generation is not None:
                    resume["generation"] = refit.generation
                send(sock, resume)
        except (OSError, ValueError) as exc:
            log.info("engine event channel %d closed: %s", conn_id, exc)
        finally:
            with self._cv:
                self._subscribers.discard(conn_id)
                self._cv.notify_all()


class ControlServer:
    """Accepts engine connections on a Unix socket; `handle(op, msg)` answers requests.

    Each message may name the local rank (GPU) its engine worker serves ("rank", 0 when
    absent); `handshake_for(rank)` is that rank's handshake (a typed error when the
    agent has no such rank)."""

    def __init__(
        self,
        path: str,
        handle: Callable[[str, dict[str, Any]], dict[str, Any]],
        handshake_for: Callable[[int], EngineHandshake],
    ):
        self.path = path
        self._handle = handle
        self.handshake_for = handshake_for
        self._stop = threading.Event()
        if os.path.exists(path):
            os.unlink(path)
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.bind(path)
        os.chmod(path, 0o600)
        self._sock.listen(64)
        self._sock.settimeout(0.5)
        self._thread = threading.Thread(target=self._accept_loop, name="control", daemon=True)
        self._ids = 0

    def start(self) -> ControlServer:
        self._thread.start()
        return self

    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self._ids += 1
            threading.Thread(target=self._serve, args=(conn, self._ids), daemon=True).start()

    def _serve(self, conn: socket.socket, conn_id: int) -> None:
        reader = conn.makefile("rb")
        try:
            while not self._stop.is_set():
                msg = recv(reader)
                if msg is None:
                    return
                op = str(msg.get("op", ""))
                try:
                    if op == "subscribe":
                        handshake = self.handshake_for(int(msg.get("rank", 0)))
                        handshake.serve_subscriber(conn_id, conn, reader, self._stop)
                        return
                    reply = {"ok": True, **self._handle(op, msg)}
                except FerryError as exc:
                    reply = {"ok": False, **exc.to_dict()}
                except (ValueError, KeyError, TypeError) as exc:
                    reply = {"ok": False, "reason": "BadRequest", "message": f"{op}: {exc}"}
                send(conn, reply)
        except (OSError, ValueError) as exc:
            log.debug("control connection %d: %s", conn_id, exc)
        finally:
            reader.close()
            conn.close()

    def stop(self) -> None:
        self._stop.set()
        self._sock.close()
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
