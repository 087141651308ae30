"""The token interceptor guards any servicer on the agent's server."""

from __future__ import annotations

import time
from concurrent import futures

import grpc
import pytest

from ferry_agent.auth import AuthInterceptor, TokenFile, call_metadata


@pytest.fixture
def server(tmp_path):
    tok = tmp_path / "token"
    tok.write_text("s3cret\n")
    tf = TokenFile(str(tok))
    srv = grpc.server(futures.ThreadPoolExecutor(2), interceptors=[AuthInterceptor(tf.get)])
    echo = grpc.unary_unary_rpc_method_handler(
        lambda req, ctx: b"pong:" + req, request_deserializer=None, response_serializer=None
    )
    srv.add_generic_rpc_handlers(
        [grpc.method_handlers_generic_handler("test.Extra", {"Ping": echo})]
    )
    port = srv.add_insecure_port("127.0.0.1:0")
    srv.start()
    ch = grpc.insecure_channel(f"127.0.0.1:{port}")
    yield ch.unary_unary("/test.Extra/Ping"), tok
    ch.close()
    srv.stop(0)


def test_right_token_passes(server):
    ping, _ = server
    assert ping(b"x", metadata=call_metadata("s3cret"), timeout=5) == b"pong:x"


@pytest.mark.parametrize("md", [(), call_metadata("wrong"), (("authorization", "s3cret"),)])
def test_missing_or_wrong_token_is_refused(server, md):
    ping, _ = server
    with pytest.raises(grpc.RpcError) as err:
        ping(b"x", metadata=md, timeout=5)
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_rotated_token_file_takes_effect(server):
    ping, tok = server
    time.sleep(0.01)
    tok.write_text("n3w")
    import os

    os.utime(tok, (time.time() + 5, time.time() + 5))
    assert ping(b"y", metadata=call_metadata("n3w"), timeout=5) == b"pong:y"
    with pytest.raises(grpc.RpcError):
        ping(b"y", metadata=call_metadata("s3cret"), timeout=5)


def test_empty_token_file_refused_at_start(tmp_path):
    (tmp_path / "t").write_text("\n")
    with pytest.raises(ValueError, match="empty"):
        TokenFile(str(tmp_path / "t"))
