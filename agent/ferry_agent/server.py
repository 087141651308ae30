"""The agent's gRPC server: FerryAgent servicer plus any extra servicers (e.g. ArtifactCache),
all behind the same peer check: mTLS with per-pod identities (cluster mode) or the
shared token (standalone; auth.py)."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from concurrent import futures
from typing import TYPE_CHECKING, Any

import grpc

from .auth import AuthInterceptor, PeerInterceptor, PeerTls
from .errors import BadRequest, FerryError, NotDeclared
from .follow import MAX_FOLLOWERS
from .peer import MAX_MESSAGE
from .proto import ferry_agent_pb2 as _pb
from .proto import ferry_agent_pb2_grpc as _pb_grpc
from .request import PullRequest

# Generated modules have no type stubs.
pb: Any = _pb
pb_grpc: Any = _pb_grpc

if TYPE_CHECKING:
    from .agent import Agent
    from .rank import RankAgent

log = logging.getLogger(__name__)


class AgentServicer(pb_grpc.FerryAgentServicer):
    """Every request names the local rank it is about (0 for single-GPU pods)."""

    def __init__(self, agent: Agent):
        self.agent = agent

    def _rank(self, request: Any, context: grpc.ServicerContext) -> RankAgent:
        try:
            return self.agent.rank(int(request.rank))
        except BadRequest as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, exc.message)
            raise  # abort raises; this keeps type checkers informed

    def GetManifest(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        rank = self._rank(request, context)
        try:
            man = rank.manifest(with_metadata=not request.omit_nixl_metadata)
        except NotDeclared as exc:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, exc.message)
        return man.to_proto()

    def GetVersion(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        rank = self._rank(request, context)
        return pb.VersionInfo(**rank.version_info(), **rank.header_info())

    def Health(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        rank = self._rank(request, context)
        info = rank.version_info()
        return pb.HealthResponse(
            ok=True,
            state=rank.state,
            pod=self.agent.config.pod,
            namespace=self.agent.config.namespace,
            version=info["version"],
            fingerprint=info["fingerprint"],
        )

    def RelayStatus(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        rank = self._rank(request, context)
        st, layout = rank.relay_status(request.after_bytes, request.wait_ms / 1e3)
        return pb.RelayStatusReply(
            pull_id=st.pull_id,
            version=st.version,
            state=st.state,
            epoch=st.epoch,
            bytes_done=st.bytes_done,
            bytes_total=st.bytes_total,
            completed=[
                pb.ByteRange(slab=r.slab, offset=r.offset, nbytes=r.nbytes) for r in st.completed
            ],
            **layout,
        )

    def GetDigests(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        rank = self._rank(request, context)
        got = rank.digests(request.version)
        if got is None:
            context.abort(
                grpc.StatusCode.NOT_FOUND,
                f"no content digests of version {request.version!r} here",
            )
        return got.to_proto(pb)

    def Follow(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        from .follow import stream

        rank = self._rank(request, context)
        try:
            sub = rank.followers.subscribe(str(request.follower), str(request.serving))
        except BadRequest as exc:
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, exc.message)
        for notice in stream(sub, context.is_active):
            yield notice.to_proto(pb)

    def Report(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        from .follow import Outcome

        self._rank(request, context).followers.report(Outcome.from_proto(request))
        return pb.FollowReportReply()

    def Pull(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        cancel = threading.Event()
        context.add_callback(cancel.set)  # the caller cancelled (or the call ended)
        try:
            r = self.agent.pull(PullRequest.from_proto(request), cancel=cancel)
        except FerryError as exc:
            return pb.PullReply(
                ok=False,
                reason=exc.reason,
                message=exc.message,
                differences=[str(d) for d in exc.fields.get("differences", [])],
            )
        except ValueError as exc:  # a malformed request the typed checks did not name
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
            transport=str(r.details.get("transport", "nixl")),
            verified_pieces=int(r.details.get("verified_pieces", 0)),
            digest=str(r.details.get("digest", "")),
        )


class AgentServer:
    """grpc.server behind the peer check (mTLS when `tls` is given, else the token);
    `add_servicer` before `start` to serve more."""

    def __init__(
        self,
        agent: Agent,
        host: str,
        port: int,
        token: Callable[[], str],
        max_workers: int = 16,
        tls: PeerTls | None = None,
    ):
        # Each Follow stream holds a thread for its lifetime (ferry_agent.follow): room for them
        # on top of the calls that come and go.
        max_workers += MAX_FOLLOWERS
        self.interceptor: grpc.ServerInterceptor = (
            PeerInterceptor(tls) if tls is not None else AuthInterceptor(token)
        )
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
        if tls is not None:
            self.port = self._server.add_secure_port(f"{host}:{port}", tls.server_credentials())
        else:
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
