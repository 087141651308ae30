"""vLLM: cold start from the pod's agent (`--load-format ferry`) and refit through
vLLM's own weight-transfer API (backend `ferry`) or a worker extension.

Installed through vLLM's plugin entry point (`vllm.general_plugins`, see
agent/pyproject.toml), so `vllm serve ... --load-format ferry
--weight-transfer-config '{"backend": "ferry"}'` needs no patch to vLLM. Every
worker process loads the plugin; each connects to the pod's agent with its own
local rank (its GPU) and sees only that rank's slabs.

Cold start (FerryModelLoader): wait until the agent holds a complete version
(pulled from a running peer by a RefitJob), then load it:

- checkpoint-format slabs (HF names, what a trainer publishes): through the
  model's own `load_weights`, so fused `qkv_proj` / `gate_up_proj`, TP slicing
  and quantization post-processing are vLLM's (one copy: slab -> parameter);
- kernel-format slabs (another vLLM replica's parameters, names and shapes equal
  to this model's): the parameters are re-pointed at the slab views, no copy.
  This is for scaling a fleet out from a running replica: the agent's later writes
  would land under a serving engine, so a replica that refits loads checkpoint
  format (refits go through vLLM's update round trip below).

Refit (FerryWeightTransferEngine / FerryWorkerExtension): Ferry's pull lands in
the agent's slabs while vLLM keeps serving (vLLM reads its own parameters, not
the slabs: the agent's pause is acknowledged at once unless an apply is
copying); then vLLM's update round trip applies the held version between steps
with `load_weights` under layerwise reload. Parameter addresses stay put, so
captured CUDA graphs stay valid. An apply holds the slabs' reader lock: the
agent cannot start writing the next version while it copies.

Memory: one slab copy of the served checkpoint per GPU (the pull target), next
to vLLM's own parameters. Double-buffer pulls swap slab sets, which is safe
here (the apply reads whichever set the agent holds) but doubles that cost;
with kernel-format binding a swap re-points parameters, which captured CUDA
graphs do not follow, so use single-buffer pulls with binding.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from vllm.distributed.weight_transfer.base import (
    TrainerInitInfo,
    TrainerWeightTransferEngine,
    WeightTransferEngine,
    WeightTransferInitInfo,
    WeightTransferUpdateInfo,
)
from vllm.model_executor.model_loader.base_loader import BaseModelLoader

from ..client import ENV_SOCKET, EngineClient
from ..errors import FerryError
from .refit import RefitHandler

log = logging.getLogger(__name__)

LOAD_FORMAT = "ferry"
BACKEND = "ferry"
ENV_LOAD_TIMEOUT = "FERRY_LOAD_TIMEOUT_S"
ENV_LOAD_VERSION = "FERRY_LOAD_VERSION"  # cold start waits for exactly this version
DEFAULT_LOAD_TIMEOUT_S = 600.0
BUSY = ("Pulling", "Writing")


class NoVersion(FerryError):
    """The pod's agent did not hold the wanted version in time."""

    reason = "NoVersion"


# -- the plugin -------------------------------------------------------------------------
def register() -> None:
    """vllm.general_plugins entry point: runs in every vLLM process at start."""
    from vllm.distributed.weight_transfer.factory import (
        WeightTransferEngineFactory,
        WeightTransferTrainerFactory,
    )
    from vllm.model_executor.model_loader import register_model_loader

    register_model_loader(LOAD_FORMAT)(FerryModelLoader)
    for factory, name in (
        (WeightTransferEngineFactory, "FerryWeightTransferEngine"),
        (WeightTransferTrainerFactory, "FerryTrainerWeightTransferEngine"),
    ):
        if BACKEND not in factory._registry:  # plugins load once per process, guard anyway
            factory.register_engine(BACKEND, __name__, name)


# -- the worker's connection to its agent ---------------------------------------------
def local_rank() -> int:
    """This worker's GPU within the pod: vLLM's local rank once its process groups
    exist, else $LOCAL_RANK / $FERRY_AGENT_RANK."""
    try:
        from vllm.distributed.parallel_state import get_world_group

        return int(get_world_group().local_rank)
    except (AssertionError, ImportError, AttributeError):
        return int(os.environ.get("LOCAL_RANK", os.environ.get("FERRY_AGENT_RANK", "0")))


def connect(socket: str | None = None, rank: int | None = None) -> EngineClient:
    path = socket or os.environ.get(ENV_SOCKET)
    if not path:
        raise FerryError(
            f"no Ferry agent socket: set {ENV_SOCKET} (the injected sidecar sets it) or pass "
            "socket in the init info"
        )
    return EngineClient(path, rank=local_rank() if rank is None else rank)


def wait_for_version(client: EngineClient, version: str = "", timeout_s: float = 600.0) -> str:
    """Block until the agent holds a complete version (`version`, if given)."""
    deadline = time.monotonic() + timeout_s
    while True:
        status = client.status()
        held = str(status.get("version") or "")
        if held and status.get("state") not in BUSY and (not version or held == version):
            return held
        if time.monotonic() > deadline:
            want = repr(version) if version else "a version"
            raise NoVersion(
                f"the agent (rank {client.rank}) did not hold {want} within {timeout_s:g}s "
                f"(it holds {held!r}, state {status.get('state')})",
                held=held,
            )
        time.sleep(0.05)


def kernel_format(model: torch.nn.Module, views: dict[str, Any]) -> bool:
    """True when the slabs hold exactly this model's parameters (names, shapes, dtypes):
    another replica's post-processed tensors, bindable with no copy."""
    params = dict(model.named_parameters())
    return set(params) == set(views) and all(
        tuple(p.shape) == tuple(views[n].shape) and p.dtype == views[n].dtype
        for n, p in params.items()
    )


def _sync(views: dict[str, Any]) -> None:
    """load_weights may queue its copies on the GPU: they read the slabs until done."""
    devices = {v.device for v in views.values() if v.device.type == "cuda"}
    for device in devices:
        torch.cuda.synchronize(device)


class SlabApply:
    """Copies the version the agent holds into a vLLM model with its `load_weights`,
    holding the slabs' reader lock (the agent waits to write until it is done)."""

    def __init__(self, client: EngineClient):
        self.client = client
        self.refits = RefitHandler(client)

    def start(self, timeout_s: float) -> SlabApply:
        self.refits.start(timeout_s)
        return self

    def apply(
        self, model: torch.nn.Module, version: str = "", timeout_s: float = DEFAULT_LOAD_TIMEOUT_S
    ) -> str:
        """Load the held version (`version` if given) into `model`; returns it."""
        with self.refits.reading():
            held = wait_for_version(self.client, version, timeout_s)
            views = self.client.attach()
            model.load_weights(iter(views.items()))  # type: ignore[operator]
            _sync(views)
        log.info("ferry: applied %s (%d tensors, rank %d)", held, len(views), self.client.rank)
        return held

    def stop(self) -> None:
        self.refits.stop()
        self.client.close()


# -- cold start -------------------------------------------------------------------------
class FerryModelLoader(BaseModelLoader):
    """`--load-format ferry`: the weights come from the pod's agent, not from files."""

    def download_model(self, model_config: Any) -> None:  # nothing to download
        return None

    def load_weights(self, model: torch.nn.Module, model_config: Any) -> None:
        extra = getattr(self.load_config, "model_loader_extra_config", None) or {}
        timeout_s = float(
            extra.get("timeout_s", os.environ.get(ENV_LOAD_TIMEOUT, DEFAULT_LOAD_TIMEOUT_S))
        )
        version = str(extra.get("version", os.environ.get(ENV_LOAD_VERSION, "")))
        client = connect(extra.get("socket"), extra.get("rank"))
        held = wait_for_version(client, version, timeout_s)
        views = client.attach()
        if kernel_format(model, views):
            # Another replica's parameters: re-point ours at the slab views (no copy). The
            # client stays open for the life of the model: the views are its mappings.
            # Parameters only: vLLM's buffers (attention scales, rotary caches) are built
            # by the model itself and never published.
            with torch.no_grad():
                for name, param in model.named_parameters():
                    param.data = views[name]
            model._ferry_client = client  # type: ignore[attr-defined]
            log.info("ferry: bound %s in place (%d parameters, no copy)", held, len(views))
            return
        try:
            model.load_weights(iter(views.items()))  # type: ignore[operator]
            _sync(views)
            after = client.status()
            if str(after.get("version") or "") != held or after.get("state") in BUSY:
                raise NoVersion(f"the agent's version changed from {held!r} while loading it")
            log.info("ferry: loaded %s through load_weights (%d tensors)", held, len(views))
        finally:
            client.close()


# -- refit: vLLM's native weight-transfer API ------------------------------------------
@dataclass
class FerryWeightTransferInitInfo(WeightTransferInitInfo):
    socket: str | None = None  # default $FERRY_AGENT_SOCKET
    rank: int | None = None  # default the worker's local rank
    timeout_s: float = DEFAULT_LOAD_TIMEOUT_S


@dataclass
class FerryWeightTransferUpdateInfo(WeightTransferUpdateInfo):
    version: str = ""  # the version to apply ("": whatever the agent holds now)
    timeout_s: float = DEFAULT_LOAD_TIMEOUT_S


class FerryWeightTransferEngine(
    WeightTransferEngine[FerryWeightTransferInitInfo, FerryWeightTransferUpdateInfo]
):
    """The worker side of backend `ferry`: the bytes are already in this rank's slabs
    (the agent pulled them); `update_weights` applies them with `load_weights`."""

    init_info_cls = FerryWeightTransferInitInfo
    update_info_cls = FerryWeightTransferUpdateInfo

    def __init__(self, config: Any, vllm_config: Any, device: torch.device, model: torch.nn.Module):
        super().__init__(config, vllm_config, device, model)
        self.slabs: SlabApply | None = None
        self.applied = ""

    def init_transfer_engine(self, init_info: FerryWeightTransferInitInfo) -> None:
        self.slabs = SlabApply(connect(init_info.socket, init_info.rank)).start(init_info.timeout_s)

    def start_weight_update(self) -> None:
        from vllm.model_executor.model_loader.reload import initialize_layerwise_reload

        initialize_layerwise_reload(self.model)

    def update_weights(self, update_info: dict[str, Any]) -> None:
        # The base class then synchronizes the current accelerator (for asynchronous
        # NCCL / IPC receives); the apply has already synchronized the devices its copies
        # ran on, and there may be none (host slabs, a CPU model).
        self.receive_weights(self.parse_update_info(update_info))

    def receive_weights(self, update_info: FerryWeightTransferUpdateInfo) -> None:
        if self.slabs is None:
            raise RuntimeError("init_weight_transfer_engine was not called for backend ferry")
        self.applied = self.slabs.apply(self.model, update_info.version, update_info.timeout_s)

    def finish_weight_update(self) -> None:
        from vllm.model_executor.model_loader.reload import finalize_layerwise_reload

        finalize_layerwise_reload(self.model, self.model_config)

    def shutdown(self) -> None:
        if self.slabs is not None:
            self.slabs.stop()
            self.slabs = None


# -- refit: a worker extension for vLLM builds without the weight-transfer API ----------
class FerryWorkerExtension:
    """`--worker-extension-cls ferry_agent.engines.vllm.FerryWorkerExtension`; drive it
    with `llm.collective_rpc("ferry_update_weights", args=(version,))`."""

    _ferry: SlabApply | None = None

    def ferry_update_weights(
        self, version: str = "", timeout_s: float = DEFAULT_LOAD_TIMEOUT_S
    ) -> str:
        if self._ferry is None:
            self._ferry = SlabApply(connect()).start(timeout_s)
        model = self.model_runner.model  # type: ignore[attr-defined]
        return self._ferry.apply(model, version, timeout_s)


# -- the trainer's side -----------------------------------------------------------------
@dataclass
class FerryTrainerInitInfo(TrainerInitInfo):
    """Trainer side of backend `ferry`: publish through this pod's agent, then have the
    targets' agents pull it (`targets`: their gRPC endpoints, host:port[/rank]; empty when
    a RefitJob moves the bytes), then drive vLLM's update round trip."""

    backend: ClassVar[str] = BACKEND
    socket: str | None = None
    source_endpoint: str = ""  # this agent's gRPC endpoint, as targets reach it
    targets: list[str] = field(default_factory=list)
    token: str = ""  # the agents' bearer token (standalone mode)
    dtype: str | None = None  # served dtype, e.g. "bfloat16" (cast from the master weights)
    version_prefix: str = "step-"
    timeout_s: float = DEFAULT_LOAD_TIMEOUT_S


class FerryTrainerWeightTransferEngine(TrainerWeightTransferEngine[FerryTrainerInitInfo]):
    init_info_cls = FerryTrainerInitInfo

    @classmethod
    def trainer_init(
        cls, init_info: FerryTrainerInitInfo, *, client: Any, source: Any = None
    ) -> Any:
        self = cls(client=client, source=source, is_sender=init_info.is_sender, rank=init_info.rank)
        self.info, self.step = init_info, 0
        self.publisher = None
        # Every rank iterates the source (a sharded one gathers: collectives).
        state = dict(source.iter_full()) if source is not None else {}
        if init_info.is_sender:
            from .publish import ModulePublisher

            dtype = getattr(torch, init_info.dtype) if init_info.dtype else None
            self.publisher = ModulePublisher(connect(init_info.socket, 0), state, dtype=dtype)
            client.init_weight_transfer_engine({"timeout_s": init_info.timeout_s})
        return self

    def send_weights(self) -> None:
        """Publish the source's weights as the next version, pull it into every target,
        then apply it there with vLLM's start / update / finish round trip."""
        state = dict(self.source.iter_full()) if self.source is not None else {}
        if not self.is_sender or self.publisher is None:
            return
        self.step += 1
        version = f"{self.info.version_prefix}{self.step}"
        self.publisher.publish(version, state)
        self._pull_targets(version)
        self.client.start_weight_update()
        self.client.update_weights({"version": version, "timeout_s": self.info.timeout_s})
        self.client.finish_weight_update(weight_version=version)

    def _pull_targets(self, version: str) -> None:
        if not self.info.targets:
            return  # a RefitJob (or the operator) moves the bytes
        from ..peer import AgentClient
        from ..request import PullRequest

        for target in self.info.targets:
            endpoint, _, rank = target.partition("/")
            agent = AgentClient(endpoint, self.info.token, timeout=self.info.timeout_s)
            try:
                agent.pull(
                    PullRequest(
                        (self.info.source_endpoint,),
                        version=version,
                        quiesce=True,
                        timeout_s=self.info.timeout_s,
                        rank=int(rank or 0),
                    )
                )
            finally:
                agent.close()

    def shutdown(self) -> None:
        if self.publisher is not None and self.publisher.client is not None:
            self.publisher.client.close()
