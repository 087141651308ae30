"""`ferry artifact ...`: pack, verify, install, keygen.

Each command prints one line; on refusal it prints `refused: <reason>: <detail>`
to stderr and exits 1 (2 for usage errors, as argparse does).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ferry_agent.artifacts.errors import ArtifactRejected, IdentityError, PackError
from ferry_agent.artifacts.identity import Identity
from ferry_agent.artifacts.install import verify
from ferry_agent.artifacts.lock import install_archive_once
from ferry_agent.artifacts.pack import pack
from ferry_agent.artifacts.trust import generate_keypair, load_private_key


def _fail(msg: str) -> int:
    print(f"refused: {msg}", file=sys.stderr)
    return 1


def _identity(path: str | None) -> Identity | None:
    if path is None:
        return None
    return Identity.from_dict(json.loads(Path(path).read_text()))


def cmd_pack(args: argparse.Namespace) -> int:
    try:
        key = load_private_key(args.key) if args.key else None
        result = pack(args.dir, args.output, identity=_identity(args.identity), key=key)
    except (PackError, IdentityError, ValueError, OSError) as exc:
        return _fail(str(exc))
    signed = "signed" if result.signature else "unsigned"
    print(f"packed {result.manifest_id} files={result.files} bytes={result.bytes} {signed}")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    try:
        info = verify(args.file, pubkey=args.pubkey, max_bytes=args.max_bytes)
    except ArtifactRejected as exc:
        return _fail(str(exc))
    except (ValueError, OSError) as exc:
        return _fail(str(exc))
    m = info.manifest
    signed = "signed" if info.signature else "unsigned"
    print(f"ok {m.id} files={len(m.files)} bytes={m.payload_size} {signed}")
    return 0


def cmd_install(args: argparse.Namespace) -> int:
    try:
        result = install_archive_once(
            args.file,
            args.into,
            pubkey=args.pubkey,
            max_bytes=args.max_bytes,
            failure_ttl=args.failure_ttl,
            max_attempts=args.max_attempts,
            wait_timeout=args.wait_timeout,
        )
    except ArtifactRejected as exc:
        return _fail(str(exc))
    except (ValueError, OSError) as exc:
        return _fail(str(exc))
    if not result.ok:
        return _fail(f"{result.state}: {result.reason}")
    print(f"{result.state} {result.key} into {args.into}")
    return 0


def cmd_keygen(args: argparse.Namespace) -> int:

    pub = args.pubkey or f"{args.key}.pub"
    try:
        generate_keypair(args.key, pub)
    except (OSError, ValueError) as exc:
        return _fail(str(exc))
    print(f"wrote {args.key} (private, 0600) and {pub} (public)")
    return 0


def _nonneg(value: str) -> int:
    n = int(value)
    if n < 0:
        raise argparse.ArgumentTypeError("must be >= 0")
    return n


def register(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "artifact", help="pack, verify and install JIT compile caches", description=__doc__
    )
    sub = parser.add_subparsers(dest="artifact_command", metavar="COMMAND", required=True)

    p = sub.add_parser("pack", help="pack a cache dir into an artifact file")
    p.add_argument("dir")
    p.add_argument("-o", "--output", required=True, help="artifact file to write")
    p.add_argument("--key", help="ed25519 private key (PEM) to sign the manifest id")
    p.add_argument("--identity", help="identity JSON file ({'kind': ..., 'fields': {...}})")
    p.set_defaults(func=cmd_pack)

    p = sub.add_parser("verify", help="verify an artifact file without installing it")
    p.add_argument("file")
    p.add_argument("--pubkey", help="require a signature by this ed25519 public key (PEM)")
    p.add_argument("--max-bytes", type=_nonneg, default=None)
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("install", help="verify and install an artifact, once per cache dir")
    p.add_argument("file")
    p.add_argument("--into", required=True, help="cache dir to install into")
    p.add_argument("--pubkey", help="require a signature by this ed25519 public key (PEM)")
    p.add_argument("--max-bytes", type=_nonneg, default=None)
    p.add_argument("--failure-ttl", type=float, default=30.0, help="seconds a failure is final")
    p.add_argument("--max-attempts", type=int, default=3)
    p.add_argument("--wait-timeout", type=float, default=900.0)
    p.set_defaults(func=cmd_install)

    p = sub.add_parser("keygen", help="write an ed25519 key pair (PEM)")
    p.add_argument("key", help="private key file to create (0600)")
    p.add_argument("--pubkey", help="public key file (default: KEY.pub)")
    p.set_defaults(func=cmd_keygen)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ferry")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["artifact", *(sys.argv[1:] if argv is None else argv)])
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
