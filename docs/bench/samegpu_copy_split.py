"""8 GiB device-to-device copies on one GPU, split or whole: one torch copy, eight 1 GiB
torch copies between separate allocations, and Ferry's CopyStream (cudaMemcpyAsync on
its own stream, an event per copy, as ipc.py queues them) over separate or contiguous
memory. Median and minimum of 15, in ms; prints JSON.
Results: samegpu-copies-20261203-h200.json (docs/benchmarks.md)."""

import json
import statistics
import time

import torch

from ferry_agent.cuda import CopyStream

G = 1 << 30
N = 8
reps = 15
a = torch.empty(N * G, dtype=torch.uint8, device="cuda:0")
b = torch.empty(N * G, dtype=torch.uint8, device="cuda:0")
sa = [torch.empty(G, dtype=torch.uint8, device="cuda:0") for _ in range(N)]
sb = [torch.empty(G, dtype=torch.uint8, device="cuda:0") for _ in range(N)]
out = {}


def med(f):
    f()
    torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        f()
        ts.append(time.perf_counter() - t0)
    return round(statistics.median(ts) * 1e3, 4), round(min(ts) * 1e3, 4)


def single():
    b.copy_(a)
    torch.cuda.synchronize()


def eight_torch():
    for x, y in zip(sa, sb, strict=True):
        y.copy_(x)
    torch.cuda.synchronize()


cs = CopyStream(0)


def eight_cs_events():
    evs = []
    for x, y in zip(sa, sb, strict=True):
        cs.copy(y.data_ptr(), x.data_ptr(), G)
        evs.append(cs.mark())
    for e in evs:
        cs.wait(e)
        cs.release(e)


def one_cs_big():
    cs.copy(b.data_ptr(), a.data_ptr(), N * G)
    e = cs.mark()
    cs.wait(e)
    cs.release(e)


def eight_cs_contig():
    evs = []
    for k in range(N):
        cs.copy(b.data_ptr() + k * G, a.data_ptr() + k * G, G)
        evs.append(cs.mark())
    for e in evs:
        cs.wait(e)
        cs.release(e)


for name, f in [
    ("torch_single_8g", single),
    ("torch_8x1g_sep", eight_torch),
    ("cs_8x1g_sep_events", eight_cs_events),
    ("cs_one_8g", one_cs_big),
    ("cs_8x1g_contig_events", eight_cs_contig),
    ("torch_single_8g_again", single),
]:
    out[name] = med(f)
print(json.dumps(out))
