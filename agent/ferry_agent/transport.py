"""The only module that talks to NIXL: register, describe, read, wait (NixlTransport).

Everything above speaks in slabs, plans and descriptor arrays (numpy N x 3:
address, length, device id). Prepared descriptor lists, transfer handles and
remote agents are cached across refit cycles under a key the caller builds
from the peer's identity and layout fingerprint; a new key for the same peer
drops the old entry (and its remote agent), so nothing stale is ever reused.

Lanes: the transport holds several NIXL agents, each its own UCX context and
worker. Lane 0 serves peers (its metadata is what they load; it keeps NIXL's
progress thread for their connection requests) and never posts our READs.
Lanes 1..N post our READs, one posting thread each, and have no progress
thread: their posting threads drive progress by polling. Why: UCX serialises
everything on one worker, and over its CMA path (host memory, same node) the
copy runs inside the post while holding the worker lock, so a progress thread
on the same worker spins on that lock for the whole copy (perf: 34% of cycles
in pthread_spin_lock). Measured here, 1 GiB in 16 READs: 1 lane with a
progress thread 5.0-5.4 GB/s, 2 lanes with 4.9-6.2, 2 lanes without 8.0-10.3.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any, NamedTuple

import numpy as np

from .errors import TransferFailed, TransferTimeout

log = logging.getLogger(__name__)

# How long a poll sleeps between checks; short because host copies finish in ms.
POLL_INTERVAL_S = 0.0002
# Threads posting READs per lane. Posts on one UCX worker are serialised, so more
# threads on a lane only add contention (measured here, 2 cores, 1 GiB in 16
# chunks, one lane: 1 thread 3.2-5.2 GB/s, 2 threads 2.2-3.0, 4 threads 1.7-2.6).
DEFAULT_POST_THREADS = 1
# Read lanes for host memory: one per core a 2-core node can spare (see above).
DEFAULT_HOST_LANES = 2
# Microseconds the serving lane's progress thread waits between idle polls. nixl's
# Python wrapper hard-codes 0: an idle agent then burns a full core (measured:
# 2.95 CPU-s in 3 s of idle sleep; 0.05 CPU-s at 100 us, 0.02 at 1000 us), which
# on a small node starves the copies. The thread only answers peers' connection
# set-up (our READs run on lanes without one), so 1 ms of latency costs nothing.
DEFAULT_PROGRESS_DELAY_US = 1000
_construct_lock = threading.Lock()


NET_DEVICES = "UCX_NET_DEVICES"


@contextlib.contextmanager
def _net_devices(value: str | None) -> Iterator[None]:
    """UCX_NET_DEVICES = `value` ("" removes it) inside the block, restored after."""
    if value is None:
        yield
        return
    before = os.environ.get(NET_DEVICES)
    if value:
        os.environ[NET_DEVICES] = value
    else:
        os.environ.pop(NET_DEVICES, None)
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(NET_DEVICES, None)
        else:
            os.environ[NET_DEVICES] = before


def import_nixl() -> ModuleType:
    """nixl_cu13, then nixl_cu12, then the `nixl` meta-package: whichever is installed."""
    errors = []
    for name in ("nixl_cu13._api", "nixl_cu12._api", "nixl._api"):
        try:
            return importlib.import_module(name)
        except ImportError as exc:
            errors.append(f"{name}: {exc}")
    raise ImportError("no NIXL package found (" + "; ".join(errors) + ")")


@dataclass
class TransportStats:
    registrations: int = 0  # regions registered, summed over lanes
    deregistrations: int = 0
    remote_agents_added: int = 0
    remote_agents_removed: int = 0
    dlists_prepared: int = 0  # prepare() calls that built lists (all lanes at once)
    dlists_reused: int = 0
    xfer_handles_created: int = 0
    transfers_posted: int = 0
    bytes_read: int = 0

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


@dataclass
class Prepared:
    """Prepared descriptor lists for one peer, on every lane, plus reusable READ handles."""

    key: tuple
    peer: str
    handles: list[tuple[int, Any]]  # (lane, handle)
    handle_bytes: list[int]
    dlists: list[tuple[int, Any]]  # (lane, prepared dlist) to release
    descriptors: int


class _Remote(NamedTuple):
    """A peer's NIXL agent loaded on one lane, and the metadata key it was loaded under."""

    md_key: str
    name: str


class _HeaderRead(NamedTuple):
    """The prepared READ of a peer's version header into our landing header."""

    key: tuple
    lane: int
    local: Any  # prepared dlist
    remote: Any
    handle: Any


@dataclass
class ReadResult:
    bytes: int
    seconds: float
    descriptors: int
    handles: int
    per_peer_bytes: dict[str, int] = field(default_factory=dict)


class _ReadState:
    """Per-lane work queues shared by the posting threads of one read()."""

    def __init__(
        self,
        work: Sequence[Prepared],
        lanes: int,
        rate: float | None,
        on_complete: Callable[[Prepared, int], None] | None = None,
    ):
        self._lock = threading.Lock()
        self.on_complete = on_complete
        self.queues: list[list[tuple[Prepared, int]]] = [[] for _ in range(lanes)]
        for e in work:
            for i, (lane, _) in enumerate(e.handles):
                self.queues[lane].append((e, i))
        for q in self.queues:  # interleave peers: striped sources are read together
            q.sort(key=lambda ei: ei[1])
        self.total = sum(len(q) for q in self.queues)
        self.rate = rate
        self.posted_bytes = 0
        self.per_peer: dict[str, int] = {}
        self.done = 0
        self.error: BaseException | None = None
        self.abort = False
        self.idle = threading.Event()  # set when a worker exits (done, error or abort)
        self.exited = 0
        self.t0 = time.perf_counter()

    def take(self, lane: int) -> tuple[Prepared, int] | None:
        while not self.abort:
            with self._lock:
                q = self.queues[lane]
                if not q:
                    return None
                ahead = (
                    self.posted_bytes / self.rate - (time.perf_counter() - self.t0)
                    if self.rate
                    else 0
                )
                if ahead <= 0:
                    entry, i = q.pop(0)
                    self.posted_bytes += entry.handle_bytes[i]
                    return entry, i
            time.sleep(min(max(ahead, 0.0005), 0.01))  # paced (max_bytes_per_s)
        return None

    def finish(self, entry: Prepared, i: int) -> None:
        with self._lock:
            self.per_peer[entry.peer] = self.per_peer.get(entry.peer, 0) + entry.handle_bytes[i]
            self.done += 1
        if self.on_complete is not None:
            self.on_complete(entry, i)


def _from_nixl(exc: BaseException) -> bool:
    """An error raised by NIXL's bindings (nixlRemoteDisconnectError, nixlBackendError...):
    callers get TransferFailed instead, as this interface promises."""
    return type(exc).__module__.startswith("nixl")


class NixlTransport:
    def __init__(
        self,
        name: str,
        *,
        lanes: int = 1,
        num_threads: int = 0,
        post_threads: int = DEFAULT_POST_THREADS,
        backends: Sequence[str] = ("UCX",),
        thread_init: Callable[[], None] | None = None,
        progress_delay_us: int = DEFAULT_PROGRESS_DELAY_US,
        net_devices: str | None = None,
    ):
        """`net_devices`: UCX_NET_DEVICES for this transport's NIXL agents alone (None:
        whatever the process has; "": none inherited). UCX reads it when each agent's
        UCX context is created, so it is set for exactly that moment, under a lock:
        one process can hold one transport per GPU, each on its GPU's NICs."""
        self._nixl = import_nixl()
        self.name = name
        self.post_threads = max(1, post_threads)
        self.thread_init = thread_init  # run first on every posting thread (CUDA device)
        sync = self._nixl.nixl_thread_sync_t

        def config(progress_thread: bool) -> Any:
            return self._nixl.nixl_agent_config(
                enable_prog_thread=progress_thread,
                enable_listen_thread=False,
                num_threads=num_threads,
                backends=list(backends),
                # Each agent is only ever called under its lane lock (below). NIXL's
                # STRICT mode serialised the lanes against each other instead
                # (measured, 2 lanes: STRICT 4.7-5.5 GB/s, own locks + NONE 5.2-6.4).
                sync_mode=sync.NIXL_THREAD_SYNC_NONE,
            )

        with _construct_lock, _net_devices(net_devices):
            self._agents = [self._new_agent(name, config(True), progress_delay_us)]
            self._agents += [
                self._new_agent(f"{name}~read{k}", config(False), progress_delay_us)
                for k in range(1, max(1, lanes) + 1)
            ]
        self._lane_locks = [threading.Lock() for _ in self._agents]
        self._lock = threading.RLock()
        self._remotes: dict[tuple[str, int], _Remote] = {}  # (peer, lane) ->
        self._prepared: dict[str, Prepared] = {}
        self._headers: dict[str, _HeaderRead] = {}  # peer ->
        self._leaked: list[tuple[int, Any]] = []
        # Posting threads outlive a read(): each waits on its own queue for the next job
        # (starting fresh threads every cycle cost ~0.2 ms of a warm pull). Idle ones
        # wait here; a read() that finds none idle (a concurrent read) starts another.
        self._idle_posters: list[queue.SimpleQueue] = []
        self._posters_lock = threading.Lock()
        self.stats = TransportStats()

    @property
    def lanes(self) -> int:
        """Read lanes (agents 1..N); agent 0 only serves peers."""
        return len(self._agents) - 1

    def _new_agent(self, name: str, cfg: Any, delay_us: int) -> Any:
        """nixl_agent(name, cfg) with the progress thread's idle delay set (see above):
        the wrapper builds its own nixlAgentConfig, so we set the field on its way in."""
        bind = self._nixl.nixlBind
        real = bind.nixlAgent

        def make(agent_name: str, agent_config: Any) -> Any:
            agent_config.pthrDelay = delay_us
            return real(agent_name, agent_config)

        bind.nixlAgent = make  # under _construct_lock (the caller holds it)
        try:
            return self._nixl.nixl_agent(name, cfg)
        finally:
            bind.nixlAgent = real

    # -- memory -----------------------------------------------------------------
    def register(self, regions: Sequence[tuple[int, int, int]], mem: str) -> list[Any]:
        """Register regions (addr, len, device) once on every lane; token for deregister()."""
        with self._lock:
            regs = []
            for agent, lock in zip(self._agents, self._lane_locks, strict=True):
                with lock:
                    regs.append(agent.register_memory([(a, n, d, "") for a, n, d in regions], mem))
                self.stats.registrations += len(regions)
            return regs

    def deregister(self, regs: list[Any], count: int = 1) -> None:
        with self._lock:
            for agent, lock, reg in zip(self._agents, self._lane_locks, regs, strict=True):
                with lock:
                    agent.deregister_memory(reg)
                self.stats.deregistrations += count

    def metadata(self) -> bytes:
        """What peers load to read from us (lane 0 only)."""
        with self._lane_locks[0]:
            return bytes(self._agents[0].get_agent_metadata())

    # -- peers and prepared lists -------------------------------------------------
    def _remote(self, peer: str, lane: int, md_key: str, metadata: Callable[[], bytes]) -> str:
        cached = self._remotes.get((peer, lane))
        if cached and cached.md_key == md_key:
            return cached.name
        if cached:
            self._release_header(peer)  # its remote list names the old remote agent
            self._remove_remote(peer, lane)
        with self._lane_locks[lane]:
            name = self._agents[lane].add_remote_agent(metadata())
        name = name.decode() if isinstance(name, bytes) else str(name)
        self._remotes[(peer, lane)] = _Remote(md_key, name)
        self.stats.remote_agents_added += 1
        return name

    def _remove_remote(self, peer: str, lane: int) -> None:
        cached = self._remotes.pop((peer, lane), None)
        if cached is None:
            return
        try:
            with self._lane_locks[lane]:
                self._agents[lane].remove_remote_agent(cached.name)
        except Exception as exc:
            log.debug("remove_remote_agent(%s): %s", cached.name, exc)
        self.stats.remote_agents_removed += 1

    def prepare(
        self,
        peer: str,
        key: tuple,
        metadata: Callable[[], bytes],
        local: np.ndarray,
        remote: np.ndarray,
        *,
        local_mem: str,
        remote_mem: str,
        groups: Sequence[Sequence[int]],
    ) -> Prepared:
        """Prepared lists + one READ handle per descriptor group, cached under (peer, key).

        `key` must change whenever the peer's memory or our plan changes (the caller
        uses peer NIXL name, slab generation, fingerprint and plan digest); key[0]
        identifies the peer's metadata, so a new key[0] also re-adds the remote agent.
        Groups go to lanes round-robin.
        """
        with self._lock:
            entry = self._prepared.get(peer)
            if entry is not None and entry.key == key:
                self.stats.dlists_reused += 1
                return entry
            if entry is not None:
                self._release_entry(entry)
                del self._prepared[peer]
            local = np.ascontiguousarray(local, np.uint64)
            remote = np.ascontiguousarray(remote, np.uint64)
            used = sorted({1 + g % self.lanes for g in range(len(groups))})
            dlists: list[tuple[int, Any]] = []
            lane_lists: dict[int, tuple[Any, Any]] = {}
            for lane in used:
                agent = self._agents[lane]
                remote_name = self._remote(peer, lane, str(key[0]), metadata)
                with self._lane_locks[lane]:
                    ldl = agent.prep_xfer_dlist("", local, local_mem)
                    rdl = agent.prep_xfer_dlist(remote_name, remote, remote_mem)
                lane_lists[lane] = (ldl, rdl)
                dlists += [(lane, ldl), (lane, rdl)]
            self.stats.dlists_prepared += 1
            handles: list[tuple[int, Any]] = []
            sizes: list[int] = []
            for g, members in enumerate(groups):
                lane = 1 + g % self.lanes
                ldl, rdl = lane_lists[lane]
                idx = np.asarray(members, dtype=np.int32)
                with self._lane_locks[lane]:
                    h = self._agents[lane].make_prepped_xfer("READ", ldl, idx, rdl, idx)
                handles.append((lane, h))
                sizes.append(int(local[list(members), 1].sum()))
                self.stats.xfer_handles_created += 1
            entry = Prepared(key, peer, handles, sizes, dlists, len(local))
            self._prepared[peer] = entry
            return entry

    def prepare_header(
        self,
        peer: str,
        md_key: str,
        metadata: Callable[[], bytes],
        local: tuple[int, int, int],
        remote: tuple[int, int, int],
        mem: str,
    ) -> None:
        """One READ handle (lane 1) from a peer's version header into our landing header,
        cached with the peer like its data lists (same remote agent, same md_key)."""
        with self._lock:
            key = (md_key, local, remote, mem)
            cached = self._headers.get(peer)
            if cached is not None and cached.key == key:
                return
            self._release_header(peer)
            lane = 1
            name = self._remote(peer, lane, md_key, metadata)
            agent, one = self._agents[lane], np.zeros(1, np.int32)
            with self._lane_locks[lane]:
                ldl = agent.prep_xfer_dlist("", np.array([local], np.uint64), mem)
                rdl = agent.prep_xfer_dlist(name, np.array([remote], np.uint64), mem)
                h = agent.make_prepped_xfer("READ", ldl, one, rdl, one)
            self._headers[peer] = _HeaderRead(key, lane, ldl, rdl, h)

    def has_header(self, peer: str) -> bool:
        return peer in self._headers

    def read_header(self, peer: str, timeout_s: float = 1.0) -> None:
        """READ the peer's version header into our landing header and wait (a few us:
        it is 24 bytes). Raises TransferFailed / TransferTimeout; the caller falls back
        to GetVersion."""
        entry = self._headers.get(peer)
        if entry is None:
            raise TransferFailed(f"no version header prepared for {peer}", peer=peer)
        lane, h = entry.lane, entry.handle
        agent, lock = self._agents[lane], self._lane_locks[lane]
        end = time.monotonic() + timeout_s
        try:
            with lock:
                state = agent.transfer(h)
            while state == "PROC":
                if time.monotonic() > end:
                    with self._lock:
                        self._leaked.append((lane, h))
                        self._headers.pop(peer, None)
                    raise TransferTimeout(f"version header READ from {peer} timed out", peer=peer)
                time.sleep(0)
                with lock:
                    state = agent.check_xfer_state(h)
        except Exception as exc:
            if not _from_nixl(exc):
                raise
            state = "ERR"  # e.g. nixlRemoteDisconnectError: the peer is gone
        if state != "DONE":
            with self._lock:
                self._release_header(peer)
            raise TransferFailed(f"version header READ from {peer} failed", peer=peer)

    def _release_header(self, peer: str) -> None:
        entry = self._headers.pop(peer, None)
        if entry is None:
            return
        self._release_xfer(entry.lane, entry.handle)
        for dl in (entry.local, entry.remote):
            self._release_dlist(entry.lane, dl)

    def _release_entry(self, entry: Prepared) -> None:
        for lane, h in entry.handles:
            self._release_xfer(lane, h)
        for lane, dl in entry.dlists:
            self._release_dlist(lane, dl)
        entry.handles = []

    def _release_xfer(self, lane: int, h: Any) -> None:
        """Release a transfer handle; one still in flight after an abort is kept in
        _leaked and retried at close()."""
        try:
            with self._lane_locks[lane]:
                self._agents[lane].release_xfer_handle(h)
        except Exception as exc:
            log.debug("release_xfer_handle: %s", exc)
            self._leaked.append((lane, h))

    def _release_dlist(self, lane: int, dl: Any) -> None:
        try:
            with self._lane_locks[lane]:
                self._agents[lane].release_dlist_handle(dl)
        except Exception as exc:
            log.debug("release_dlist_handle: %s", exc)

    def drop(self, peer: str) -> None:
        """Forget everything about a peer: handles, lists, remote agents."""
        with self._lock:
            entry = self._prepared.pop(peer, None)
            if entry is not None:
                self._release_entry(entry)
            self._release_header(peer)
            for lane in range(len(self._agents)):
                self._remove_remote(peer, lane)

    def peers(self) -> list[str]:
        return list(self._prepared)

    # -- transfers ------------------------------------------------------------------
    def read(
        self,
        work: Sequence[Prepared],
        *,
        deadline: float,
        check: Callable[[], None] | None = None,
        check_interval_s: float = 0.05,
        max_inflight: int = 64,
        max_bytes_per_s: float | None = None,
        on_complete: Callable[[Prepared, int], None] | None = None,
    ) -> ReadResult:
        """Post every handle of every entry and wait until all are DONE.

        `post_threads` workers per lane each keep up to `max_inflight` handles
        outstanding. `deadline` is a time.monotonic() value; `check` runs every
        `check_interval_s` on the calling thread and may raise to abort (e.g. the
        source version changed). On any error the affected peers are dropped so
        the next cycle starts clean. `on_complete(entry, i)` runs on a posting thread
        as soon as handle i of entry is DONE (its bytes have landed): keep it cheap."""
        st = _ReadState(work, len(self._agents), max_bytes_per_s, on_complete)
        per_worker = max(1, max_inflight // (self.lanes * self.post_threads))
        jobs = [
            (st, lane, per_worker)
            for lane in range(len(self._agents))
            if st.queues[lane]
            for _ in range(min(self.post_threads, len(st.queues[lane])))
        ]
        next_check = time.monotonic() + check_interval_s
        started = 0
        try:
            for job in jobs:
                self._poster().put(job)
                started += 1
            while True:
                st.idle.clear()
                if st.exited >= started:
                    break
                now = time.monotonic()
                if now > deadline:
                    raise TransferTimeout(
                        f"pull not finished before its deadline ({st.done} of {st.total} READ groups done)",
                        done=st.done,
                    )
                if check is not None and now >= next_check:
                    check()
                    next_check = now + check_interval_s
                if st.error is not None:
                    raise st.error
                # Woken by the last worker to finish: a fixed join() tick added up to
                # its whole period to every pull (2 ms is 10% of an 8 GB NVLink pull).
                st.idle.wait(min(check_interval_s, max(0.0, deadline - now)) or None)
            if st.error is not None:
                raise st.error
        except BaseException:
            st.abort = True
            end = time.monotonic() + 1.0  # bounded: a worker stops polling once abort is set
            while st.exited < started and time.monotonic() < end:
                st.idle.wait(0.01)
                st.idle.clear()
            for entry in work:
                self.drop(entry.peer)
            raise
        seconds = time.perf_counter() - st.t0
        total = sum(st.per_peer.values())
        self.stats.bytes_read += total
        self.stats.transfers_posted += st.done
        return ReadResult(
            total, seconds, sum(e.descriptors for e in work), st.done, dict(st.per_peer)
        )

    def _poster(self) -> queue.SimpleQueue:
        """An idle posting thread's job queue (a new thread when none is idle)."""
        with self._posters_lock:
            if self._idle_posters:
                return self._idle_posters.pop()
        jobs: queue.SimpleQueue = queue.SimpleQueue()
        threading.Thread(
            target=self._poster_loop, args=(jobs,), name="nixl-post", daemon=True
        ).start()
        return jobs

    def _poster_loop(self, jobs: queue.SimpleQueue) -> None:
        init_error: BaseException | None = None
        try:
            if self.thread_init is not None:
                self.thread_init()
        except BaseException as exc:  # reported by every job this thread is given
            init_error = exc
        while True:
            job = jobs.get()
            if job is None:
                return
            st, lane, max_inflight = job
            self._worker(st, lane, max_inflight, jobs, init_error)

    def _worker(
        self,
        st: _ReadState,
        lane: int,
        max_inflight: int,
        jobs: queue.SimpleQueue,
        init_error: BaseException | None,
    ) -> None:
        agent, lock = self._agents[lane], self._lane_locks[lane]
        inflight: list[tuple[Prepared, int]] = []
        peer = ""  # of the NIXL call in progress, for the error
        try:
            if init_error is not None:
                raise init_error
            while not st.abort:
                while len(inflight) < max_inflight:
                    item = st.take(lane)
                    if item is None:
                        break
                    entry, i = item
                    peer = entry.peer
                    with lock:
                        state = agent.transfer(entry.handles[i][1])
                    if state == "ERR":
                        raise TransferFailed(
                            f"NIXL refused a READ from {entry.peer}", peer=entry.peer
                        )
                    if state == "DONE":
                        st.finish(entry, i)
                    else:
                        inflight.append(item)
                if not inflight:
                    return
                still = []
                for entry, i in inflight:
                    peer = entry.peer
                    with lock:
                        state = agent.check_xfer_state(entry.handles[i][1])
                    if state == "ERR":
                        raise TransferFailed(f"NIXL READ from {entry.peer} failed", peer=entry.peer)
                    if state == "DONE":
                        st.finish(entry, i)
                    else:
                        still.append((entry, i))
                inflight = still
                if inflight:
                    time.sleep(POLL_INTERVAL_S)
        except BaseException as exc:  # handed to the caller's thread
            if _from_nixl(exc):  # e.g. nixlRemoteDisconnectError: a source died mid-READ
                exc = TransferFailed(f"NIXL READ from {peer} failed: {exc!r}", peer=peer)
            st.error = exc
            st.abort = True
        finally:
            if init_error is None:  # idle again before the caller wakes
                with self._posters_lock:
                    self._idle_posters.append(jobs)
            with st._lock:
                st.exited += 1
            st.idle.set()

    def close(self) -> None:
        with self._posters_lock:
            for jobs in self._idle_posters:
                jobs.put(None)
            self._idle_posters.clear()
        with self._lock:
            for peer in list(
                set(self._prepared) | set(self._headers) | {p for p, _ in self._remotes}
            ):
                self.drop(peer)
            leaked, self._leaked = self._leaked, []
            for lane, h in leaked:
                self._release_xfer(lane, h)
            self._leaked.clear()  # a handle still refusing release now is abandoned
