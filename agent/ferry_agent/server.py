"""The agent's gRPC server: FerryAgent servicer plus any extra servicers (e.g. ArtifactCache),
all behind the same token interceptor."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from concurrent import futures
from typing import TYPE_CHECKING, Any

import grpc

from .auth import AuthInterceptor
from .errors import FerryError, NotDeclared
from .peer import MAX_MESSAGE
from .proto import ferry_agent_pb2 as _pb
from .proto import ferry_agent_pb2_grpc as _pb_grpc

# Generated modules have no type stubs.
pb: Any = _pb
pb_grpc: Any = _pb_grpc

if TYPE_CHECKING:
    from .agent import Agent

log = logging.getLogger(__name__)


class AgentServicer(pb_grpc.FerryAgentServicer):
    def __init__(self, agent: Agent):
        self.agent = agent

    def GetManifest(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        try:
            man = self.agent.manifest(with_metadata=not request.omit_nixl_metadata)
        except NotDeclared as exc:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, exc.message)
        return man.to_proto()

    def GetVersion(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        return pb.VersionInfo(**self.agent.version_info(), **self.agent.header_info())

    def Health(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        a = self.agent
        info = a.version_info()
        return pb.HealthResponse(
            ok=True,
            state=a.state,
            pod=a.config.pod,
            namespace=a.config.namespace,
            version=info["version"],
            fingerprint=info["fingerprint"],
        )

    def RelayStatus(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        st = self.agent.relay_status(request.after_bytes, request.wait_ms / 1e3)
        completed = [
            pb.ByteRange(slab=s, offset=o, nbytes=n) for s, o, n in st.pop("completed", [])
        ]
        return pb.RelayStatusReply(completed=completed, **st)

    def Pull(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        cancel = threading.Event()
        context.add_callback(cancel.set)  # the caller cancelled (or the call ended)
        try:
            r = self.agent.pull(
                list(request.sources),
                version=request.version or None,
                timeout_s=request.timeout_s or 60.0,
                chunk_bytes=request.chunk_bytes or None,
                max_gbps=request.max_gbps or None,
                retries=request.retries,
                quiesce=request.quiesce_engine,
                quiesce_timeout_s=request.quiesce_timeout_s or 30.0,
                relay=request.relay,
                double_buffer=request.double_buffer,
                cancel=cancel,
            )
        except FerryError as exc:
            return pb.PullReply(
                ok=False,
                reason=exc.reason,
                message=exc.message,
                differences=[str(d) for d in exc.fields.get("differences", [])],
            )
        except ValueError as exc:
            return pb.PullReply(ok=False, reason="BadRequest", message=str(exc))
        s = r.stats
        return pb.PullReply(
            ok=True,
            bytes=r.bytes,
            seconds=r.seconds,
            descriptors=r.descriptors,
            version=r.version,
            gbps=r.gbps,
            attempts=r.attempts,
            registrations=s.get("registrations", 0),
            dlists_prepared=s.get("dlists_prepared", 0),
            dlists_reused=s.get("dlists_reused", 0),
            remote_agents_added=s.get("remote_agents_added", 0),
            register_s=r.register_s,
            total_s=r.total_s,
            source_bytes=r.source_bytes,
            phases_s=r.phases_s,
            xfer_handles_created=s.get("xfer_handles_created", 0),
        )


class AgentServer:
    """grpc.server with the token interceptor; `add_servicer` before `start` to serve more."""

    def __init__(
        self, agent: Agent, host: str, port: int, token: Callable[[], str], max_workers: int = 16
    ):
        self.interceptor = AuthInterceptor(token)
        self._server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="grpc"),
            interceptors=[self.interceptor],
            options=[
                ("grpc.max_receive_message_length", MAX_MESSAGE),
                ("grpc.max_send_message_length", MAX_MESSAGE),
                ("grpc.so_reuseport", 0),
            ],
        )
        pb_grpc.add_FerryAgentServicer_to_server(AgentServicer(agent), self._server)
        self.port = self._server.add_insecure_port(f"{host}:{port}")
        if self.port == 0:
            raise OSError(f"cannot bind gRPC on {host}:{port}")
        self._started = False

    def add_servicer(self, add_fn: Callable[[Any, grpc.Server], None], servicer: Any) -> None:
        """e.g. add_servicer(artifacts_pb2_grpc.add_ArtifactCacheServicer_to_server, impl)."""
        if self._started:
            raise RuntimeError("add servicers before start()")
        add_fn(servicer, self._server)

    def start(self) -> None:
        self._server.start()
        self._started = True

    def stop(self, grace: float = 1.0) -> None:
        self._server.stop(grace).wait(grace + 1)
