"""SGLang on Ferry: cold start from the pod's agent, and refits through SGLang's own session.

Cold start (every TP rank's scheduler process, no patch to SGLang):

    python -m sglang.launch_server --model-path /config-only-dir --tp 2 \\
        --load-format dummy --model-loader-extra-config '{"ferry": {}}' \\
        --custom-weight-loader ferry_agent.engines.sglang.load_held_version

`register` (entry point `ferry` in the group `sglang.srt.plugins`, loaded by SGLang in
every scheduler) puts an AROUND hook on `sglang.srt.model_loader.loader.get_model_loader`:
a LoadConfig whose `model_loader_extra_config` has a `ferry` key gets `FerryModelLoader`;
anything else goes to SGLang's own choice untouched. The loader connects to the agent's
rank for its GPU (`EngineClient(rank=gpu_id)`), builds the model as SGLang's default
loader does, and fills it from the slab views:

- checkpoint format (HF names: what trainers publish): SGLang's own `load_weights` and
  post-processing (fusion, TP slicing, quantization stay SGLang's);
- SGLang layout (the slabs hold exactly this rank's `state_dict()`: a peer serving
  post-processed, TP-sharded tensors): copied straight into the parameters, with no
  `load_weights` and no post-processing (they were done where the tensors came from).

Refit (`SGLangRefitter`, in any process of the pod that reaches the agent's socket and
SGLang's HTTP port): one RefitHandler per TP rank runs the agent's pause/ack/resume
handshake; the agent pulls while SGLang serves (SGLang reads its own parameters, not
the slabs). Once every rank's slabs hold the new version, one session is applied:

    pause_generation(retract) -> begin_weight_update
    -> update_weights_from_tensor(one payload per TP rank, weight_version=<Ferry version>)
    -> end_weight_update -> continue_generation          (continue runs even on failure)

A payload is SGLang's `MultiprocessingSerializer` of one named empty tensor, a ticket
naming the version: `load_held_version`, SGLang's custom weight loader, then maps that
rank's slabs in the scheduler (the agent's own CUDA IPC handle) and runs SGLang's
`load_weights` on the views. Why not the slab tensors themselves: CUDA memory a process
opened through CUDA IPC cannot be exported again (torch's reductions need the caching
allocator's base allocation), and SGLang's unpickler admits only its allowlist, so the
scheduler has to open the agent's handle itself. That is also what keeps a slab from
being overwritten while SGLang reads it: the loader synchronizes the device before
SGLang replies, and a rank's handler answers the agent's next pause only after the
session returned (a pull that cannot wait that long fails with nothing written).

Not spoken: SGLang's weight-cache client protocol (docs/sglang.md says why).
"""

from __future__ import annotations

import base64
import json
import logging
import os
import threading
import time
import urllib.request
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ..client import ENV_SOCKET, EngineClient
from ..errors import FerryError
from ..layout import Placement
from .refit import RefitHandler

log = logging.getLogger(__name__)

GET_MODEL_LOADER = "sglang.srt.model_loader.loader.get_model_loader"
LOADER_PATH = "ferry_agent.engines.sglang.load_held_version"
EXTRA_KEY = "ferry"  # the key in --model-loader-extra-config that selects Ferry's loader
TICKET_PREFIX = "ferry.version:"
# How long a scheduler waits for its agent rank to hold a version (a cold pull of a
# large model runs while the engine starts).
DEFAULT_WAIT_S = 600.0
# How long the ranks of one refit wait for each other to hold the same version.
DEFAULT_GATHER_S = 60.0


class NoVersion(FerryError):
    """The agent's rank held no complete version within the wait."""

    reason = "NoVersion"


class WrongVersion(FerryError):
    """A refit asked for a version the rank's slabs do not hold (a newer pull overtook it,
    or the pull failed): nothing was loaded."""

    reason = "WrongVersion"


class SessionFailed(FerryError):
    """An SGLang weight-update call answered success=false (its message is kept)."""

    reason = "SessionFailed"


# -- pure decisions --------------------------------------------------------------------------


@dataclass(frozen=True)
class LoaderOptions:
    """`--model-loader-extra-config '{"ferry": {...}}'`: every field optional."""

    socket: str = ""  # the agent's control socket; "" = $FERRY_AGENT_SOCKET
    rank: int | None = None  # the agent's local rank; None = the scheduler's gpu_id
    wait_s: float = DEFAULT_WAIT_S

    @classmethod
    def parse(cls, extra: Any) -> LoaderOptions | None:
        """None when the extra config does not ask for Ferry; ValueError naming the field
        when it asks wrongly."""
        if isinstance(extra, str):
            extra = json.loads(extra) if extra.strip() else {}
        if not isinstance(extra, Mapping) or EXTRA_KEY not in extra:
            return None
        raw = extra[EXTRA_KEY] or {}
        if not isinstance(raw, Mapping):
            raise ValueError(
                f"--model-loader-extra-config: {EXTRA_KEY!r} must be an object, e.g. "
                '{"ferry": {"socket": "/run/ferry/agent.sock"}}'
            )
        unknown = sorted(set(raw) - {"socket", "rank", "wait_s"})
        if unknown:
            raise ValueError(
                f"--model-loader-extra-config: ferry.{unknown[0]} is not a field "
                "(known: socket, rank, wait_s)"
            )
        rank = raw.get("rank")
        if rank is not None and (not isinstance(rank, int) or rank < 0):
            raise ValueError(
                f"--model-loader-extra-config: ferry.rank must be an int >= 0, got {rank!r}"
            )
        return cls(str(raw.get("socket", "")), rank, float(raw.get("wait_s", DEFAULT_WAIT_S)))


@dataclass(frozen=True)
class TensorMeta:
    name: str
    dtype: str
    shape: tuple[int, ...]


def is_sglang_layout(held: Iterable[TensorMeta], model: Iterable[TensorMeta]) -> bool:
    """The slabs hold exactly the model's own tensors (names, dtypes, shapes): a peer
    serving SGLang's post-processed, TP-sharded layout for this rank."""
    return {t.name: t for t in held} == {t.name: t for t in model}


def ticket_name(version: str) -> str:
    return TICKET_PREFIX + version


def ticket_version(named: Iterable[tuple[str, Any]]) -> str:
    """The version a refit payload asks for; ValueError if it is not one Ferry ticket."""
    names = [name for name, _ in named]
    if len(names) != 1 or not names[0].startswith(TICKET_PREFIX):
        raise ValueError(
            f"{LOADER_PATH} takes one Ferry ticket ({TICKET_PREFIX}<version>), got {names[:3]}"
        )
    return names[0][len(TICKET_PREFIX) :]


@dataclass(frozen=True)
class Call:
    """One HTTP call of the weight-update session: SGLang's endpoint and its JSON body."""

    endpoint: str
    body: dict[str, Any]


def session_calls(version: str, payloads: list[str], *, flush_cache: bool = True) -> list[Call]:
    """The session, in SGLang's order (continue_generation is issued by the runner even
    when a step before it fails)."""
    return [
        Call("/pause_generation", {"mode": "retract"}),
        Call("/begin_weight_update", {}),
        Call(
            "/update_weights_from_tensor",
            {
                "serialized_named_tensors": payloads,
                "load_format": LOADER_PATH,
                "weight_version": version,
                "flush_cache": flush_cache,
            },
        ),
        Call("/end_weight_update", {}),
        Call("/continue_generation", {}),
    ]


# -- the SGLang side: plugin, cold-start loader, refit loader ------------------------------


def register() -> None:
    """Entry point (group `sglang.srt.plugins`): route Ferry's LoadConfigs to our loader."""
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    HookRegistry.register(GET_MODEL_LOADER, _get_model_loader, HookType.AROUND)


def _get_model_loader(original: Callable[..., Any], load_config: Any, *args: Any, **kw: Any) -> Any:
    if LoaderOptions.parse(getattr(load_config, "model_loader_extra_config", None)) is None:
        return original(load_config, *args, **kw)
    return loader_class()(load_config)


_clients: dict[tuple[str, int], EngineClient] = {}
# (socket, rank) the cold start loaded from: refits in this scheduler read the same rank.
_loaded_from: list[Any] = []
_clients_lock = threading.Lock()


def agent_client(socket: str, rank: int) -> EngineClient:
    """One connection per (socket, rank) per scheduler process: the slab mapping stays
    open for refits (a queued copy never outlives its mapping)."""
    path = socket or os.environ.get(ENV_SOCKET, "")
    if not path:
        raise ValueError(
            f"no agent socket: set {ENV_SOCKET} in the engine container or "
            '--model-loader-extra-config \'{"ferry": {"socket": PATH}}\''
        )
    with _clients_lock:
        c = _clients.get((path, rank))
        if c is None:
            c = _clients[(path, rank)] = EngineClient(path, rank=rank)
        return c


def wait_for_version(client: EngineClient, wait_s: float) -> str:
    deadline = time.monotonic() + wait_s
    while True:
        s = client.status()
        if s.get("version") and s.get("state") not in ("Pulling", "Writing"):
            return str(s["version"])
        if time.monotonic() >= deadline:
            raise NoVersion(
                f"agent rank {client.rank} held no complete version after {wait_s:.0f} s "
                f"(state {s.get('state')!r}): is a RefitJob targeting this pod?",
                rank=client.rank,
                state=str(s.get("state")),
            )
        time.sleep(0.2)


def _metas(placements: Iterable[Placement]) -> list[TensorMeta]:
    return [TensorMeta(p.name, p.dtype, tuple(p.shape)) for p in placements]


def _model_metas(model: Any) -> list[TensorMeta]:
    return [
        TensorMeta(n, str(t.dtype).removeprefix("torch."), tuple(t.shape))
        for n, t in model.state_dict().items()
    ]


def _sync(device: Any) -> None:
    import torch

    if getattr(device, "type", "cpu") == "cuda":
        torch.cuda.synchronize(device)


def load_views(
    model: Any, views: Mapping[str, Any], placements: list[Placement], device: Any
) -> str:
    """Fill `model` from the slab views; returns "sglang-layout" or "checkpoint"."""
    import torch
    from sglang.srt.model_loader.loader import DefaultModelLoader

    if is_sglang_layout(_metas(placements), _model_metas(model)):
        with torch.no_grad():
            for name, t in model.state_dict().items():
                t.copy_(views[name])
        mode = "sglang-layout"
    else:
        DefaultModelLoader.load_weights_and_postprocess(model, iter(views.items()), device)
        mode = "checkpoint"
    _sync(device)  # the scheduler goes on only once its reads of the slabs finished
    return mode


def _make_loader_class() -> type:
    # Made on first use: the agent image imports this module without SGLang.
    from sglang.srt.model_loader.loader import BaseModelLoader

    class FerryModelLoader(BaseModelLoader):  # type: ignore[misc, valid-type]
        """SGLang model loader taking the weights from the pod's agent (module docstring)."""

        def __init__(self, load_config: Any):
            super().__init__(load_config)
            options = LoaderOptions.parse(load_config.model_loader_extra_config)
            self.options = options or LoaderOptions()
            self.version = ""
            self.mode = ""

        def download_model(self, model_config: Any) -> None:
            pass  # nothing to download: the agent pulls from its peers

        def load_model(self, *, model_config: Any, device_config: Any) -> Any:
            import torch
            from sglang.srt.model_loader.loader import (
                _get_quantization_config,
                _initialize_model,
            )
            from sglang.srt.model_loader.utils import set_default_torch_dtype

            device = torch.device(device_config.device)
            rank = self.options.rank
            if rank is None:
                rank = _scheduler_rank(device, _tp_rank(), getattr(device_config, "gpu_id", None))
            client = agent_client(self.options.socket, rank)
            _loaded_from[:] = [client.path, rank]
            self.version = wait_for_version(client, self.options.wait_s)
            views = client.attach()
            quant_config = _get_quantization_config(model_config, self.load_config)
            with set_default_torch_dtype(model_config.dtype):
                with device:
                    model = _initialize_model(model_config, self.load_config, quant_config)
                self.mode = load_views(model, views, client.placements, device)
            log.info(
                "ferry: loaded version %r from agent rank %d (%s, %d tensors)",
                self.version,
                rank,
                self.mode,
                len(views),
            )
            return model.eval()

    return FerryModelLoader


_loader_class: type | None = None


def loader_class() -> type:
    """`FerryModelLoader`, a subclass of SGLang's BaseModelLoader."""
    global _loader_class
    if _loader_class is None:
        _loader_class = _make_loader_class()
    return _loader_class


def load_held_version(model: Any, named_tensors: list[tuple[str, Any]]) -> None:
    """SGLang custom weight loader (`--custom-weight-loader` this path): load the version
    the ticket names from this scheduler's agent rank with SGLang's `load_weights`."""
    import torch

    version = ticket_version(named_tensors)
    device = next(model.parameters()).device
    if _loaded_from:
        socket, rank = _loaded_from
    else:
        socket, rank = "", _scheduler_rank(device, _tp_rank())
    client = agent_client(socket, rank)
    holds = str(client.status().get("version", ""))
    if holds != version:
        raise WrongVersion(
            f"agent rank {rank} holds {holds!r}, not {version!r}: nothing loaded",
            rank=rank,
            holds=holds,
            wanted=version,
        )
    views = client.attach()
    with torch.no_grad():
        model.load_weights(iter(views.items()))
    _sync(device)  # SGLang replies after this: the slabs are not read any more


def _tp_rank() -> int:
    from sglang.srt.distributed.parallel_state import get_tensor_model_parallel_rank

    return int(get_tensor_model_parallel_rank())


def _scheduler_rank(device: Any, tp_rank: int, gpu_id: int | None = None) -> int:
    """The agent rank of this scheduler: its GPU's index on the pod (the agent keeps one
    rank per local GPU), or its TP rank on CPU. $FERRY_AGENT_RANK overrides."""
    env = os.environ.get("FERRY_AGENT_RANK")
    if env is not None:
        return int(env)
    if getattr(device, "type", "cpu") == "cuda":
        if gpu_id is not None and gpu_id >= 0:
            return int(gpu_id)
        return int(device.index or 0)
    return tp_rank


def ticket_payload(version: str) -> str:
    """One TP rank's entry of `serialized_named_tensors` (base64, as SGLang's HTTP API
    takes it): `[("ferry.version:<version>", empty uint8 tensor)]`, which SGLang's
    `MultiprocessingSerializer.deserialize` (its allowlisting unpickler) reads. Pickled
    with the standard pickler, not ForkingPickler: the ticket shares no memory, and the
    CUDA-only tensor reducer SGLang patches into torch refuses a CPU tensor."""
    import pickle

    import torch

    ticket = [(ticket_name(version), torch.empty(0, dtype=torch.uint8))]
    return base64.b64encode(pickle.dumps(ticket)).decode()


# -- the refit driver ------------------------------------------------------------------------


class HttpSession:
    """SGLang's HTTP API (`python -m sglang.launch_server`): POST JSON, raise on failure."""

    def __init__(self, url: str, *, timeout_s: float = 600.0, api_key: str = ""):
        self.url = url.rstrip("/")
        self.timeout_s = timeout_s
        self.api_key = api_key

    def call(self, endpoint: str, body: dict[str, Any]) -> dict[str, Any]:
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        req = urllib.request.Request(
            self.url + endpoint, json.dumps(body).encode(), headers, method="POST"
        )
        with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
            raw = resp.read()
        try:
            out = json.loads(raw) if raw else {}
        except ValueError:
            out = {"message": raw.decode(errors="replace")}
        return out if isinstance(out, dict) else {"result": out}


@dataclass
class Applied:
    version: str
    ok: bool
    error: str = ""
    calls: list[str] = field(default_factory=list)
    seconds: float = 0.0


def apply_session(session: Any, version: str, payloads: list[str]) -> Applied:
    """Run the session; continue_generation always runs once pause_generation did."""
    t0 = time.perf_counter()
    calls = session_calls(version, payloads)
    done: list[str] = []
    paused = False
    try:
        for call in calls[:-1]:
            # a pause that errored may still have paused: continue is safe either way
            paused = paused or call.endpoint == "/pause_generation"
            reply = session.call(call.endpoint, call.body)
            done.append(call.endpoint)
            if reply.get("success") is False:
                raise SessionFailed(
                    f"{call.endpoint}: {reply.get('message', '')}",
                    endpoint=call.endpoint,
                    sglang_message=str(reply.get("message", "")),
                )
        ok, error = True, ""
    except Exception as exc:  # an HTTP error or SessionFailed: the version is not served
        ok, error = False, f"{type(exc).__name__}: {exc}"
        log.error("ferry: SGLang refit to %r failed: %s", version, error)
        if "/begin_weight_update" in done and "/end_weight_update" not in done:
            try:  # close the session so the next refit can open one
                session.call("/end_weight_update", {})
                done.append("/end_weight_update")
            except Exception:
                log.exception("end_weight_update after a failed update")
    if paused:
        try:
            session.call(calls[-1].endpoint, calls[-1].body)
            done.append(calls[-1].endpoint)
        except Exception as exc:  # SGLang stays paused: say so loudly
            ok, error = False, error or f"continue_generation failed: {type(exc).__name__}: {exc}"
            log.error("ferry: SGLang continue_generation failed, generation stays paused: %s", exc)
    return Applied(version, ok, error, done, time.perf_counter() - t0)


class SGLangRefitter:
    """Applies every version the pod's agent pulls to a running SGLang server.

    `ranks`: the agent's local ranks SGLang's TP ranks use, in TP order (TP rank i reads
    agent rank `ranks[i]`). Each rank's resume callback blocks until the session for its
    version ran, so its agent cannot write those slabs while SGLang may read them."""

    def __init__(
        self,
        session: Any,
        ranks: Iterable[int] = (0,),
        *,
        socket: str = "",
        gather_s: float = DEFAULT_GATHER_S,
        on_applied: Callable[[Applied], None] | None = None,
    ):
        self.session = session
        self.ranks = list(ranks)
        self.gather_s = gather_s
        self.on_applied = on_applied
        path = socket or os.environ.get(ENV_SOCKET, "")
        self.handlers = [
            RefitHandler(EngineClient.connect(path, rank=r), resume=self._arrival(r))
            for r in self.ranks
        ]
        self._cv = threading.Condition()
        self._arrivals: dict[str, set[int]] = {}
        self._results: dict[str, Applied] = {}
        self.applied: list[Applied] = []

    def start(self) -> SGLangRefitter:
        for h in self.handlers:
            h.start()
        return self

    def stop(self) -> None:
        for h in self.handlers:
            h.stop()
            h.client.close()

    def __enter__(self) -> SGLangRefitter:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _arrival(self, rank: int) -> Callable[[str, bool], None]:
        return lambda version, ok: self._arrived(rank, version, ok)

    def _arrived(self, rank: int, version: str, ok: bool) -> None:
        """Rank `rank`'s resume callback (its handshake thread, holding its writer lock):
        the last rank to hold `version` runs the session; the others wait for it."""
        if not ok or not version:
            return  # the old weights stay served; the agent's state says why
        with self._cv:
            got = self._arrivals.setdefault(version, set())
            got.add(rank)
            if len(got) < len(self.handlers):
                if not self._cv.wait_for(lambda: version in self._results, self.gather_s):
                    log.error(
                        "ferry: agent rank %d holds %r but not every TP rank pulled it "
                        "within %.0f s: not applied",
                        rank,
                        version,
                        self.gather_s,
                    )
                    self._arrivals.pop(version, None)
                return
        try:
            result = self.apply(version)
        except Exception as exc:  # never leave the other ranks waiting on this one
            result = Applied(version, False, f"{type(exc).__name__}: {exc}")
        with self._cv:
            self._results[version] = result
            self._arrivals.pop(version, None)
            self._cv.notify_all()

    def apply(self, version: str) -> Applied:
        payloads = [ticket_payload(version) for _ in self.ranks]
        result = apply_session(self.session, version, payloads)
        self.applied.append(result)
        if self.on_applied is not None:
            self.on_applied(result)
        return result


__all__ = [
    "Applied",
    "Call",
    "HttpSession",
    "LoaderOptions",
    "NoVersion",
    "SGLangRefitter",
    "SessionFailed",
    "WrongVersion",
    "apply_session",
    "loader_class",
    "is_sglang_layout",
    "load_held_version",
    "register",
    "session_calls",
    "ticket_payload",
    "ticket_version",
]
