"""A same-GPU copy of 8 GiB from a slab another process exported (CUDA IPC, as a
target agent maps its source's slabs), against the same copy from one of its own
slabs, Ferry's CudaIpcCopier over eight contiguous 1 GiB segments, and a torch copy.
Median of 15, in ms; prints JSON.
Results: samegpu-copies-20261203-h200.json (docs/benchmarks.md)."""

import json
import multiprocessing as mp
import statistics
import time

N = 8 << 30
REPS = 15


def med(f):
    f()
    ts = []
    for _ in range(REPS):
        t0 = time.perf_counter()
        f()
        ts.append(time.perf_counter() - t0)
    return round(statistics.median(ts) * 1e3, 4)


def child(handle_hex, q):
    import torch

    from ferry_agent.cuda import CopyStream, CudaSlab
    from ferry_agent.ipc import CudaIpcCopier
    from ferry_agent.planner import Segment

    src = CudaSlab.attach(0, handle_hex, N, 0)
    dst = CudaSlab.create(0, N, device=0)
    own = CudaSlab.create(1, N, device=0)
    cs = CopyStream(0)
    out = {}

    def one(s):
        def f():
            cs.copy(dst.addr, s.addr, N)
            e = cs.mark()
            cs.wait(e)
            cs.release(e)

        return f

    out["cs_ipc_src"] = med(one(src))
    out["cs_own_src"] = med(one(own))
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

    out["copier_ipc"] = med(copier)
    a = torch.empty(N, dtype=torch.uint8, device="cuda:0")
    b = torch.empty_like(a)

    def t():
        b.copy_(a)
        torch.cuda.synchronize()

    out["torch"] = med(t)
    out["cs_ipc_src_again"] = med(one(src))
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
