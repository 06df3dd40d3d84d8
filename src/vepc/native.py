"""C helpers built at run time with the machine's compiler and cached by the hash of what built them.

Nothing is downloaded and nothing is built at install time: a helper is compiled on first use (a
fraction of a second), kept in :func:`cache_dir`, and loaded from there by every later process. Where
no compiler (or no Python headers, or no libcrypto) is found, the caller falls back to its pure-Python
path and :func:`build_extension` says why.

>>> isinstance(compiler(), (str, type(None)))
True
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path
from types import ModuleType

__all__ = ["compiler", "cache_dir", "publish", "build_library", "build_extension", "NativeUnavailable"]

#: Seconds a compiler run may take.
COMPILE_TIMEOUT = 120


class NativeUnavailable(RuntimeError):
    """A helper cannot be built here (the message says why, in one line)."""


def compiler() -> str | None:
    """``$CC``, else ``cc`` or ``gcc`` on PATH, else None."""
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")


def cache_dir() -> Path:
    """``$VEPC_CACHE_DIR`` or ``<tmp>/vepc-native-<uid>``: where built helpers are kept.

    >>> cache_dir().name.startswith("vepc-native") or "VEPC_CACHE_DIR" in os.environ
    True
    """
    env = os.environ.get("VEPC_CACHE_DIR")
    return Path(env) if env else Path(tempfile.gettempdir()) / f"vepc-native-{os.getuid()}"


def publish(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (a temporary file renamed over it): concurrent builders
    (pytest -n) never see a half-written file. Example: ``publish(cache_dir() / "x.bin", b"...")``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_path = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".")
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp_path, path)


_CFLAGS = ["-O2", "-shared", "-fPIC", "-std=gnu11", "-Wall", "-Werror"]


def build_library(name: str, source: Path, flags: tuple[str, ...] = (), libs: tuple[str, ...] = (),
                  suffix: str = ".so", cache: Path | None = None, package: str = "gcc") -> Path:
    """The shared object compiled from ``source`` with ``flags`` and linked with ``libs``: built now, or
    the cached build of the same compiler, flags, libraries, source and Python. Raises
    :class:`NativeUnavailable` (naming ``package`` to install when the compiler is missing).

    Example: ``ctypes.CDLL(str(build_library("uffd_server", Path("uffd_server.c"))))``."""
    cc = compiler()
    if cc is None:
        raise NativeUnavailable("no C compiler found (cc, gcc or $CC)")
    key = "\0".join([os.path.basename(cc), *_CFLAGS, *flags, *libs, sys.version]).encode() + b"\0" + source.read_bytes()
    path = (cache or cache_dir()) / f"{name}-{hashlib.sha256(key).hexdigest()[:20]}{suffix}"
    if path.is_file():
        return path
    with tempfile.TemporaryDirectory(prefix="vepc-native-") as tmp:
        out = os.path.join(tmp, name + suffix)
        argv = [cc, *_CFLAGS, *flags, "-o", out, str(source), *libs]
        try:
            done = subprocess.run(argv, cwd=tmp, capture_output=True, text=True, timeout=COMPILE_TIMEOUT,
                                  check=False)
        except FileNotFoundError:
            raise NativeUnavailable(f"{cc} not found (install {package}): could not build {source.name}") from None
        except (OSError, subprocess.TimeoutExpired) as e:
            raise NativeUnavailable(f"{cc} could not build {source.name}: {e}") from None
        if done.returncode:
            last = (done.stderr.strip().splitlines() or ["(no message)"])[-1]
            raise NativeUnavailable(f"{cc} could not build {source.name}: {last}")
        try:
            publish(path, Path(out).read_bytes())
        except OSError as e:
            raise NativeUnavailable(f"cannot keep the build of {source.name} in {path.parent}: {e}") from None
    return path


def build_extension(name: str, source: Path, libs: tuple[str, ...] = (), cache: Path | None = None) -> ModuleType:
    """The CPython extension module ``name`` compiled from ``source`` (``PyInit_<name>``), linked with
    ``libs`` (:func:`build_library` with the Python headers); a damaged cached build is rebuilt. Raises
    :class:`NativeUnavailable` when it cannot be built here.

    Example: ``build_extension("_vepc_measure", Path("measure.c"), ("-l:libcrypto.so.3",)).sha256()``."""
    include = sysconfig.get_paths()["include"]
    if not os.path.isfile(os.path.join(include, "Python.h")):
        raise NativeUnavailable(f"no Python.h in {include} (install the Python development headers)")
    suffix = sysconfig.get_config_var("EXT_SUFFIX") or ".so"
    path = build_library(name, source, (f"-I{include}",), libs, suffix, cache)
    try:
        return _load(name, path)
    except NativeUnavailable:
        path.unlink(missing_ok=True)                     # a damaged cache entry is rebuilt once
    return _load(name, build_library(name, source, (f"-I{include}",), libs, suffix, cache))


def _load(name: str, path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise NativeUnavailable(f"{path} is not a loadable extension")
    try:
        module = importlib.util.module_from_spec(spec)          # dlopen happens here for an extension
        spec.loader.exec_module(module)
    except (ImportError, OSError) as e:
        raise NativeUnavailable(f"{path}: {e}") from None
    return module
