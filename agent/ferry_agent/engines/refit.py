"""The refit handshake for a serving loop: bracket forward passes, get callbacks.

    refits = RefitHandler(EngineClient.connect(), model).start()   # binds if a version is there
    refits.on_resume(lambda version, ok: print("now", version, ok))
    while serving:
        with refits.reading():         # held while the loop reads weights
            out = model.generate(...)

A background thread runs the agent's pause/ack/resume handshake (control.py):

    pause event -> pause callbacks -> wait for readers to leave (new ones wait)
    -> CUDA sync (queued kernels may still read the weights) -> ack
    -> the agent pulls -> resume event -> re-bind if the slabs moved (double buffer)
    -> state settled -> resume callbacks -> readers go on

`resume(version, ok)` gets the version the weights hold now, never the one that
was wanted: `""` means they hold no complete version. What a refit leaves:

| condition | version | when |
| --- | --- | --- |
| Serving   | the new one | the pull succeeded (`moved`: a double-buffer swap re-pointed the weights) |
| Unchanged | the old one | the pull failed before writing (engine not quiesced in time, cancelled while pausing, double-buffer pull failed): the old weights are intact |
| Partial   | ""          | the pull failed while writing: the slabs mix bytes of two versions; nothing is served until a refit succeeds |
| Empty     | ""          | nothing pulled yet |
| Unbound   | ""          | the agent holds a version but the module was refused (layout or device differ): the module's own weights are untouched, `error` says why |

After a failed pull the agent is asked which version its slabs hold, so the state
is the agent's own word (the resume event carries the same: the version the slabs
hold, "" once a single-buffer pull began writing them; the agent's state is then
NoVersion and its /readyz fails until a refit succeeds).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import Any

from ..errors import FerryError
from .bind import BoundModule

log = logging.getLogger(__name__)

PauseFn = Callable[[], None]
ResumeFn = Callable[[str, bool], None]
# How long the refit thread blocks on the event channel before looking at stop().
POLL_S = 0.2
# A handler that starts while its agent pulls waits for that pull this long.
START_TIMEOUT_S = 120.0


@dataclass(frozen=True)
class WeightsState:
    version: str  # the complete version the weights hold; "" = none (see the table above)
    ok: bool  # the last refit (or the bind at start) succeeded
    condition: str  # Serving | Unchanged | Partial | Empty | Unbound
    detail: str
    wanted: str = ""  # the version the last refit was for
    moved: bool = False  # the last refit re-pointed the weights to the other slab set
    error: str = ""
    refits: int = 0  # refits handled so far
    paused_at: float = 0.0  # time.time() of the last ack
    resumed_at: float = 0.0  # time.time() the last refit's state was settled


EMPTY = WeightsState("", False, "Empty", "no version pulled yet")


class WeightsLock:
    """Many readers (forward passes) or one writer (a refit); a waiting writer keeps
    new readers out. Not re-entrant: a reader must not enter again while inside."""

    def __init__(self) -> None:
        self._cv = threading.Condition()
        self._readers = 0
        self._writer = False
        self._waiting = 0

    @contextlib.contextmanager
    def reading(self) -> Iterator[None]:
        with self._cv:
            self._cv.wait_for(lambda: not (self._writer or self._waiting))
            self._readers += 1
        try:
            yield
        finally:
            with self._cv:
                self._readers -= 1
                self._cv.notify_all()

    @contextlib.contextmanager
    def writing(self) -> Iterator[None]:
        with self._cv:
            self._waiting += 1
            try:
                self._cv.wait_for(lambda: not (self._writer or self._readers))
            finally:
                self._waiting -= 1
            self._writer = True
        try:
            yield
        finally:
            with self._cv:
                self._writer = False
                self._cv.notify_all()


def failed_state(prev: WeightsState, wanted: str, holds: str) -> WeightsState:
    """The state after a failed pull, from the version the agent says its slabs hold."""
    if holds and holds == prev.version:
        return replace(
            prev,
            ok=False,
            condition="Unchanged",
            wanted=wanted,
            moved=False,
            detail=f"refit to {wanted!r} failed before writing: still serving {holds!r} (intact)",
        )
    if holds:
        return replace(
            prev,
            version=holds,
            ok=False,
            condition="Serving",
            wanted=wanted,
            detail=f"refit to {wanted!r} failed; the slabs hold {holds!r}",
        )
    if not prev.version:
        return replace(
            prev,
            ok=False,
            condition="Empty",
            wanted=wanted,
            moved=False,
            detail=f"refit to {wanted!r} failed; no version pulled yet",
        )
    return replace(
        prev,
        version="",
        ok=False,
        condition="Partial",
        wanted=wanted,
        moved=False,
        detail=(
            f"refit to {wanted!r} failed while writing: the weights are partial (parts of "
            f"{prev.version!r} and {wanted!r}); no version is served until a refit succeeds"
        ),
    )


class RefitHandler:
    """Runs the refit handshake for one engine process (see the module docstring).

    `module`: a torch module to bind (zero copy); None for an engine that copies
    the slab views in itself (its resume callback does `load_weights`)."""

    def __init__(
        self,
        client: Any,
        module: Any = None,
        *,
        pause: PauseFn | None = None,
        resume: ResumeFn | None = None,
    ):
        self.client = client
        self.bound = BoundModule(client, module) if module is not None else None
        self.lock = WeightsLock()
        self._pause: list[PauseFn] = [pause] if pause else []
        self._resume: list[ResumeFn] = [resume] if resume else []
        self._state = EMPTY
        self._cv = threading.Condition()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- what a serving loop uses ---------------------------------------------------------
    def on_pause(self, fn: PauseFn) -> PauseFn:
        self._pause.append(fn)
        return fn

    def on_resume(self, fn: ResumeFn) -> ResumeFn:
        self._resume.append(fn)
        return fn

    def reading(self) -> contextlib.AbstractContextManager[None]:
        """Hold while reading the weights: a refit waits for it, and it waits for a refit."""
        return self.lock.reading()

    @property
    def state(self) -> WeightsState:
        with self._cv:
            return self._state

    def wait(
        self, until: Callable[[WeightsState], bool], timeout: float | None = None
    ) -> WeightsState:
        """Block until `until(state)` holds; raises TimeoutError with the state it saw."""
        with self._cv:
            if not self._cv.wait_for(lambda: until(self._state), timeout):
                raise TimeoutError(f"weights state did not change as awaited: {self._state}")
            return self._state

    # -- lifecycle ------------------------------------------------------------------------
    def start(self, timeout_s: float = START_TIMEOUT_S) -> RefitHandler:
        """Subscribe (pulls from now on pause us first), bind to the version the agent
        already holds (waiting out a pull that started before we subscribed), and run
        the handshake thread. Raises LayoutMismatch / DeviceMismatch when the module
        does not fit the agent's layout; nothing is touched then."""
        self.client.subscribe()
        deadline = time.monotonic() + timeout_s
        status = self.client.status()
        while status["state"] in ("Pulling", "Writing") and time.monotonic() < deadline:
            time.sleep(0.05)
            status = self.client.status()
        if status.get("version"):
            self._set(self._bind_state(str(status["version"]), raise_refused=True))
        self._thread = threading.Thread(target=self._run, name="ferry-refit", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None

    def __enter__(self) -> RefitHandler:
        return self.start() if self._thread is None else self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- the handshake thread -------------------------------------------------------------
    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                refit = self.client.wait_refit(timeout=POLL_S)
                if refit is not None:
                    self._handle(refit)
            except (OSError, ConnectionError) as exc:
                if not self._stop.is_set():
                    log.error("refit channel to the agent closed: %s", exc)
                return

    def _handle(self, refit: Any) -> None:
        for on_pause in self._pause:
            try:
                on_pause()
            except Exception:  # the pull must still be acknowledged, or it waits it out
                log.exception("pause callback failed")
        with self.lock.writing():
            self._sync_device()
            paused_at = time.time()
            refit.ack()
            _, ok = refit.wait_done()
            state = self._settle(refit.version, ok)
            state = replace(
                state,
                refits=self.state.refits + 1,
                paused_at=paused_at,
                resumed_at=time.time(),
            )
            self._set(state)
            for on_resume in self._resume:
                try:
                    on_resume(state.version, state.ok)
                except Exception:
                    log.exception("resume callback failed")

    def _settle(self, wanted: str, ok: bool) -> WeightsState:
        if not ok:
            holds = str(self.client.status().get("version", ""))
            state = failed_state(self.state, wanted, holds)
            log.warning("refit to %r failed: %s", wanted, state.detail)
            return state
        return self._bind_state(wanted)

    def _bind_state(self, version: str, raise_refused: bool = False) -> WeightsState:
        if self.bound is None:
            return WeightsState(version, True, "Serving", f"serving {version!r}", wanted=version)
        try:
            result = self.bound.rebind()
        except FerryError as exc:
            if raise_refused:
                raise
            log.error("the module cannot be bound to %r: %s", version, exc)
            return WeightsState(
                "",
                False,
                "Unbound",
                f"the module was not bound to {version!r}: its own weights are untouched",
                wanted=version,
                error=f"{exc.reason}: {exc.message}",
            )
        moved = result is not None and result.moved
        detail = f"serving {version!r}"
        if moved:
            detail += " (re-pointed to the other slab set: capture CUDA graphs again)"
            log.warning(
                "refit to %r moved the weights to the other slab set: CUDA graphs captured "
                "before must be captured again",
                version,
            )
        return WeightsState(version, True, "Serving", detail, wanted=version, moved=moved)

    def _sync_device(self) -> None:
        if self.bound is None or not self.bound.bound:
            return
        device = self.bound.device
        if device is not None and device.type == "cuda":
            import torch

            torch.cuda.synchronize(device)

    def _set(self, state: WeightsState) -> None:
        with self._cv:
            self._state = state
            self._cv.notify_all()


__all__ = ["EMPTY", "RefitHandler", "WeightsLock", "WeightsState", "failed_state"]
