from __future__ import annotations

import argparse

import pytest

from ferry_agent import cli as agent_cli
from ferry_bench import cli as bench_cli
from ferry_bench.transfer import make_specs


@pytest.mark.parametrize(
    "text,n",
    [("4096", 4096), ("64Mi", 64 << 20), ("1Gi", 1 << 30), ("1GiB", 1 << 30), ("2k", 2048)],
)
def test_parse_size(text, n):
    assert agent_cli.parse_size(text) == n


def test_subcommands_register_with_funcs():
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="command")
    agent_cli.register(sub)
    bench_cli.register(sub)
    args = p.parse_args(
        ["agent", "run", "--memory", "host", "--slab-bytes", "256Mi", "--token-file", "/t"]
    )
    assert args.func is agent_cli.cmd_run and args.slab_bytes == 256 << 20
    args = p.parse_args(
        [
            "bench",
            "transfer",
            "--bytes",
            "1Gi",
            "--tensors",
            "300",
            "--memory",
            "host",
            "--sources",
            "2",
            "--json",
        ]
    )
    assert args.func is bench_cli.cmd_transfer and args.sources == 2 and args.json


def test_bench_layout_is_exact_and_mixed():
    specs = make_specs(1 << 30, 300)
    assert len(specs) == 300 and sum(s.nbytes for s in specs) == 1 << 30
    assert len({s.dtype for s in specs}) >= 4
    assert len({s.nbytes for s in specs}) > 200


def test_run_requires_a_token_file(capsys):
    p = argparse.ArgumentParser()
    agent_cli.register(p.add_subparsers(dest="command"))
    args = p.parse_args(["agent", "run"])
    args.token_file = None
    assert args.func(args) == 2
