"""Ferry's images built on this machine, without Docker or a registry (the real node).

What `images/*.Dockerfile` build from `python:3.11-slim-bookworm` is assembled here
from the same ingredients this machine already has:
- a Debian layer: the files of the Debian packages the interpreter and the wheels
  link against (`dpkg -L`), CA certificates, and an /etc/passwd naming the
  images' non-root user 65532 (also the whole "pause" sandbox image: its
  command is coreutils' `sleep infinity`);
- a Python layer: the interpreter `make setup` uses, at /usr/local as in the
  python image (standard library without its test suite);
- a Ferry layer: the locked dependencies from the environment `make setup` built
  (minus what the image leaves out: the operator's as in operator.Dockerfile;
  for the node tier the agent also leaves out torch and the CUDA wheels: host
  memory only, there is no GPU on the node) and the Ferry sources.

Each image is a docker-archive tarball (what `ctr images import` reads), cached
under ~/.cache/ferry/node/images by a hash of every file that goes in, and tagged
with that hash: a repeat run finds the tag already in containerd and imports
nothing.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import subprocess
import sys
import sysconfig
import tarfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from .paths import REPO_ROOT

USER = "65532:65532"
SITE = "/opt/ferry/site-packages"
DEBIAN_PACKAGES = (
    "libc6",
    "libgcc-s1",
    "libstdc++6",
    "zlib1g",
    "libssl3",
    "libffi8",
    "libbz2-1.0",
    "liblzma5",
    "libsqlite3-0",
    "libuuid1",
    "libexpat1",
    "libtinfo6",
    "libncursesw6",
    "libreadline8",
    "libnuma1",
)
EXTRA_FILES = ("/usr/bin/sleep", "/etc/ssl/certs/ca-certificates.crt")
# Left out of every node image: build and test tools, plotting, the HF stack.
_COMMON_SKIP = (
    "pip",
    "setuptools",
    "wheel",
    "_pytest",
    "pytest",
    "hypothesis",
    "mypy",
    "ruff",
    "matplotlib",
    "PIL",
    "pillow",
    "fontTools",
    "fonttools",
    "contourpy",
    "kiwisolver",
    "transformers",
    "tokenizers",
    "safetensors",
    "huggingface_hub",
    "hf_xet",
    "grpc_tools",
    "grpcio_tools",
    "__pycache__",
)
# operator.Dockerfile's exclusions (the data-plane packages).
OPERATOR_SKIP = (
    "torch",
    "nixl",
    "nvidia",
    "triton",
    "numpy",
    "sympy",
    "networkx",
    "mpmath",
    "jinja2",
    "markupsafe",
    "fsspec",
    "filelock",
    "cuda",
    "functorch",
    "torchgen",
)
# The agent on a CPU-only node: host memory, so no torch or CUDA user space.
AGENT_SKIP = (
    "torch",
    "nvidia",
    "triton",
    "sympy",
    "networkx",
    "mpmath",
    "cuda",
    "functorch",
    "torchgen",
    "jinja2",
)
SOURCES = {
    "agent": ("crds/ferry_api", "agent/ferry_agent"),
    "operator": ("crds/ferry_api", "operator/ferry_operator"),
}
ENTRY = [
    "/usr/local/bin/python3.11",
    "-c",
    "import sys; from ferry_api.cli import main; sys.exit(main())",
]


def cache_dir() -> Path:
    root = Path(os.environ.get("FERRY_CACHE", Path.home() / ".cache" / "ferry"))
    return root / "node" / "images"


def _skipped(name: str, skip: tuple[str, ...]) -> bool:
    """A top-level site-packages entry belongs to a skipped distribution: its name, or
    the name followed by `_`, `.` or `-` (`nvidia_cublas_cu12-…dist-info`, `numpy.libs`)."""
    n = name.lower().replace("-", "_")
    return any(n == s or n.startswith((s + "_", s + ".")) for s in (x.lower() for x in skip))


def _walk(src: Path, dest: str, skip_dirs: tuple[str, ...] = ()) -> Iterator[tuple[Path, str]]:
    if src.is_file() or src.is_symlink() and not src.is_dir():
        yield src, dest
        return
    yield src, dest
    for entry in sorted(os.scandir(src), key=lambda e: e.name):
        if entry.name in skip_dirs:
            continue
        p = Path(entry.path)
        if entry.is_dir(follow_symlinks=False):
            yield from _walk(p, f"{dest}/{entry.name}", skip_dirs)
        else:
            yield p, f"{dest}/{entry.name}"


def debian_files() -> list[tuple[Path, str]]:
    out = subprocess.run(
        ["dpkg", "-L", *DEBIAN_PACKAGES], check=True, capture_output=True, text=True
    )
    files: list[tuple[Path, str]] = []
    for line in sorted(set(out.stdout.splitlines())):
        p = Path(line)
        if line.startswith("/usr/share/") or not p.exists() or p.is_dir() and not p.is_symlink():
            continue
        files.append((p, line))
    files += [(Path(f), f) for f in EXTRA_FILES if Path(f).exists()]
    return files


def python_files() -> list[tuple[Path, str]]:
    prefix = Path(sys.base_prefix)
    ver = f"python{sys.version_info.major}.{sys.version_info.minor}"
    files: list[tuple[Path, str]] = []
    files += [(prefix / "bin" / ver, f"/usr/local/bin/{ver}")]
    for lib in (prefix / "lib").glob("libpython*"):
        files.append((lib, f"/usr/local/lib/{lib.name}"))
    files += list(
        _walk(
            prefix / "lib" / ver,
            f"/usr/local/lib/{ver}",
            (
                "test",
                "site-packages",
                "idlelib",
                "tkinter",
                "ensurepip",
                "turtledemo",
                f"config-{sys.version_info.major}.{sys.version_info.minor}-x86_64-linux-gnu",
            ),
        )
    )
    return files


def deps_site_packages() -> Path:
    """The locked environment `make setup` chains .venv to (ferry-deps.pth)."""
    purelib = Path(sysconfig.get_paths()["purelib"])
    pth = purelib / "ferry-deps.pth"
    if pth.exists():
        found = re.search(r"addsitedir\('([^']+)'\)", pth.read_text())
        if found:
            return Path(found.group(1))
    return purelib


def ferry_files(kind: str) -> list[tuple[Path, str]]:
    skip = _COMMON_SKIP + (OPERATOR_SKIP if kind == "operator" else AGENT_SKIP)
    site = deps_site_packages()
    files: list[tuple[Path, str]] = []
    for entry in sorted(os.listdir(site)):
        if entry.endswith(".pth") or entry.startswith("__editable__") or _skipped(entry, skip):
            continue
        files += list(_walk(site / entry, f"{SITE}/{entry}", ("__pycache__",)))
    for src in SOURCES[kind]:
        p = REPO_ROOT / src
        files += list(_walk(p, f"{SITE}/{p.name}", ("__pycache__",)))
    return files


def _digest(files: Iterable[tuple[Path, str]], extra: str = "") -> str:
    h = hashlib.sha256(extra.encode())
    for src, dest in files:
        st = src.lstat()
        h.update(f"{dest}\0{st.st_size}\0{int(st.st_mtime)}\0{st.st_mode}\n".encode())
    return h.hexdigest()


def _layer(files: list[tuple[Path, str]], out: Path) -> str:
    """Write a layer tar (parents first, owned by root, readable by all); return its diff_id."""
    tmp = out.with_suffix(".tmp")
    dirs: set[str] = set()
    with tarfile.open(tmp, "w", format=tarfile.GNU_FORMAT) as tar:
        for src, dest in files:
            parts = dest.strip("/").split("/")
            for i in range(1, len(parts)):
                d = "/".join(parts[:i])
                if d not in dirs:
                    dirs.add(d)
                    info = tarfile.TarInfo(d)
                    info.type, info.mode = tarfile.DIRTYPE, 0o755
                    tar.addfile(info)
            name = "/".join(parts)
            if src.is_dir() and not src.is_symlink():
                if name in dirs:
                    continue
                dirs.add(name)
            info = tar.gettarinfo(str(src), arcname=name)
            info.uid = info.gid = 0
            info.uname = info.gname = "root"
            if info.isreg():
                info.mode = info.mode | 0o444 | (0o111 if info.mode & 0o100 else 0)
                with open(src, "rb") as f:
                    tar.addfile(info, f)
            else:
                if info.isdir():
                    info.mode = 0o755
                tar.addfile(info)
        for name, text in _etc_files().items():
            info = tarfile.TarInfo(name)
            data = text.encode()
            info.size, info.mode = len(data), 0o644
            tar.addfile(info, io.BytesIO(data))
    h = hashlib.sha256()
    with open(tmp, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    tmp.rename(out)
    return "sha256:" + h.hexdigest()


def _etc_files() -> dict[str, str]:
    return {
        "etc/passwd": "root:x:0:0:root:/root:/bin/false\nnonroot:x:65532:65532:nonroot:/home/nonroot:/bin/false\n",
        "etc/group": "root:x:0:\nnonroot:x:65532:\n",
        "tmp/.keep": "",
    }


@dataclass(frozen=True)
class Image:
    ref: str  # tag as containerd knows it
    tarball: Path


LAYERS = {"base": debian_files, "python": python_files}


def build(kind: str) -> Image:
    """`kind`: pause, agent or operator. Returns the cached tarball, building it if absent."""
    cache = cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    parts: list[tuple[str, list[tuple[Path, str]]]] = [("base", debian_files())]
    if kind != "pause":
        parts += [("python", python_files()), (kind, ferry_files(kind))]
    # The interpreter is linked against libpython with an RPATH into its build prefix.
    env = [
        "PATH=/usr/local/bin:/usr/bin:/bin",
        "LD_LIBRARY_PATH=/usr/local/lib",
        f"PYTHONPATH={SITE}",
        "PYTHONDONTWRITEBYTECODE=1",
        "PYTHONUNBUFFERED=1",
        "LANG=C.UTF-8",
    ]
    cmd = {
        "pause": ["/usr/bin/sleep", "infinity"],
        "agent": ["agent", "run"],
        "operator": ["operator", "run", "--all-namespaces"],
    }[kind]
    digests = [(name, _digest(files, name)) for name, files in parts]
    tag = hashlib.sha256(
        ("".join(d for _, d in digests) + json.dumps([env, cmd])).encode()
    ).hexdigest()[:16]
    ref = f"ferry.dev/{kind}:{tag}"
    tarball = cache / f"{kind}-{tag}.tar"
    if tarball.exists():
        return Image(ref, tarball)
    diff_ids, layer_names = [], []
    for (name, files), (_, digest) in zip(parts, digests, strict=True):
        layer = cache / f"layer-{name}-{digest[:16]}.tar"
        idf = layer.with_suffix(".diffid")
        if not layer.exists() or not idf.exists():
            idf.write_text(_layer(files, layer))
        diff_ids.append(idf.read_text())
        layer_names.append(layer)
    config = {
        "architecture": "amd64",
        "os": "linux",
        "config": {
            "Env": env,
            "User": "65532:65532" if kind != "pause" else "0:0",
            "Entrypoint": [] if kind == "pause" else ENTRY,
            "Cmd": cmd,
            "WorkingDir": "/",
        },
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    }
    tmp = tarball.with_suffix(".tmp")
    with tarfile.open(tmp, "w") as tar:
        cfg = json.dumps(config).encode()
        info = tarfile.TarInfo("config.json")
        info.size = len(cfg)
        tar.addfile(info, io.BytesIO(cfg))
        for layer in layer_names:
            tar.add(str(layer), arcname=layer.name)
        manifest = json.dumps(
            [{"Config": "config.json", "RepoTags": [ref], "Layers": [p.name for p in layer_names]}]
        ).encode()
        info = tarfile.TarInfo("manifest.json")
        info.size = len(manifest)
        tar.addfile(info, io.BytesIO(manifest))
    tmp.rename(tarball)
    return Image(ref, tarball)
