"""What slows Ferry's same-GPU copy inside an agent: CudaIpcCopier on 8 GiB out of a
CUDA-IPC-mapped slab (as samegpu_copy_ipc.py), first alone, then with what an agent
process holds beside it, added one at a time: a NIXL transport with its progress
thread, the slabs registered with NIXL (VRAM), an idle gRPC server, and the copy run
from a new thread, or from a thread that lives on, while the main thread waits;
last, the copy timed inside fresh threads, with and without one CUDA call first. Median of 31, in ms; prints JSON."""

import json
import multiprocessing as mp
import queue
import statistics
import threading
import time
from concurrent import futures

N = 8 << 30
REPS = 31


def med(f):
    f()
    ts = []
    for _ in range(REPS):
        t0 = time.perf_counter()
        f()
        ts.append(time.perf_counter() - t0)
    return round(statistics.median(ts) * 1e3, 4)


def child(handle_hex, q):
    import grpc

    from ferry_agent.cuda import CudaSlab, set_device
    from ferry_agent.ipc import CudaIpcCopier
    from ferry_agent.planner import Segment
    from ferry_agent.transport import NixlTransport

    src = CudaSlab.attach(0, handle_hex, N, 0)
    dst = CudaSlab.create(0, N, device=0)
    cp = CudaIpcCopier(0)
    cp._opened["ep"] = ("k", {0: src})
    segs = [Segment(0, 0, k << 30, 0, k << 30, 1 << 30) for k in range(8)]

    def copier():
        cp.copy(
            [("ep", segs)],
            [dst.info],
            deadline=time.monotonic() + 10,
            check=lambda: None,
            on_landed=lambda s: None,
        )

    def from_thread():
        done = threading.Event()
        threading.Thread(target=lambda: (copier(), done.set())).start()
        done.wait()

    jobs: queue.SimpleQueue = queue.SimpleQueue()

    def worker():
        while True:
            done = jobs.get()
            copier()
            done.set()

    threading.Thread(target=worker, daemon=True).start()

    def from_worker():  # a thread that lives on, as a gRPC server's pool thread does
        done = threading.Event()
        jobs.put(done)
        done.wait()

    out = {"alone": med(copier)}
    t = NixlTransport("ctx", lanes=1)
    out["nixl_transport"] = med(copier)
    t.register([(dst.addr, N, 0)], "VRAM")
    out["nixl_registered"] = med(copier)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    server.add_insecure_port("127.0.0.1:0")
    server.start()
    out["grpc_server"] = med(copier)
    out["from_thread"] = med(from_thread)
    out["from_worker"] = med(from_worker)

    def in_new_thread(warm_first: bool) -> float:
        """The copy timed inside a fresh thread (no thread start-up in the figure); with
        warm_first, after one CUDA call on that thread (cudaSetDevice, untimed)."""
        got: list[float] = []

        def run():
            if warm_first:
                set_device(0)
            t0 = time.perf_counter()
            copier()
            got.append(time.perf_counter() - t0)

        th = threading.Thread(target=run)
        th.start()
        th.join()
        return got[0]

    for warm_first in (False, True):
        ts = [in_new_thread(warm_first) for _ in range(REPS)]
        key = "inside_new_thread" + ("_after_set_device" if warm_first else "")
        out[key] = round(statistics.median(ts) * 1e3, 4)
    out["alone_again_last"] = med(copier)
    server.stop(0)
    q.put(out)


if __name__ == "__main__":
    from ferry_agent.cuda import CudaSlab

    src = CudaSlab.create(0, N, device=0)
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=child, args=(src.ipc_handle.hex(), q))
    p.start()
    print(json.dumps(q.get()))
    p.join()
