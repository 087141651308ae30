"""How much slab memory an agent may be made to allocate (pure, but for the host's size).

A target with no layout adopts its source's (pull.py adopt_layout, relay, reshard):
what a peer claims decides what we allocate. Two limits hold before any allocation:

    the request's   max_bytes (the WeightSource's status.bytes) on the tensor bytes
                    adopted, and fingerprint (its status.fingerprint) on their names,
                    dtypes and shapes, recomputed from the tensor list
    the agent's     --max-slab-bytes on every slab set it holds (the engine's declare
                    and the double-buffer standby set too); by default, for host slabs,
                    90% of the smaller of the host's memory and /dev/shm; none for
                    cuda slabs (cudaMalloc fails cleanly when the GPU is full)
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TYPE_CHECKING

from .errors import LayoutMismatch, LayoutTooLarge
from .layout import TensorSpec, fingerprint

if TYPE_CHECKING:
    from .request import PullRequest

# Of the host memory (or /dev/shm) host slabs may take by default: the engine and the
# agent need the rest.
HOST_FRACTION = 0.9
AGENT_LIMIT = "--max-slab-bytes"


def host_memory_bytes(shm_dir: str = "/dev/shm") -> int:
    """The smaller of physical memory and the size of the shm filesystem (a pod's
    /dev/shm emptyDir is sized by its sizeLimit)."""
    phys = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    try:
        st = os.statvfs(shm_dir)
        shm = st.f_frsize * st.f_blocks
    except OSError:
        shm = 0
    return min(phys, shm) if shm else phys


def default_max_slab_bytes(memory: str) -> int:
    """The agent's limit when --max-slab-bytes is not given (0: none)."""
    return int(HOST_FRACTION * host_memory_bytes()) if memory == "host" else 0


def check_slab_bytes(need: int, held: int, limit: int) -> None:
    """`need` more slab bytes on top of `held`, under the agent's `limit` (0: none)."""
    if limit and held + need > limit:
        raise LayoutTooLarge(
            f"the layout needs {need} bytes of slabs ({held} held already), over this "
            f"agent's {AGENT_LIMIT} {limit}: raise {AGENT_LIMIT} (FERRY_MAX_SLAB_BYTES) "
            "if the model is this large",
            limit=AGENT_LIMIT,
            limit_bytes=limit,
            bytes=held + need,
        )


def check_adopted(specs: Sequence[TensorSpec], request: PullRequest) -> None:
    """A layout offered by a source, against the request's bounds (the WeightSource's)."""
    nbytes = sum(s.nbytes for s in specs)
    if request.max_bytes is not None and nbytes > request.max_bytes:
        raise LayoutTooLarge(
            f"the source offers a layout of {nbytes} bytes, over the pull's max_bytes "
            f"{request.max_bytes} (the WeightSource's status.bytes): refused, nothing allocated",
            limit="max_bytes",
            limit_bytes=request.max_bytes,
            bytes=nbytes,
        )
    if request.fingerprint is not None:
        have = fingerprint(specs)
        if have != request.fingerprint:
            raise LayoutMismatch(
                f"the source's layout fingerprint {have} is not the pull's fingerprint "
                f"{request.fingerprint} (the WeightSource's status.fingerprint): refused, "
                "nothing allocated",
                differences=[f"fingerprint: {have} != {request.fingerprint}"],
            )
