"""The real guest's program: assembly kept in this folder, built at run time with the machine's binutils
(``as --64``, ``objcopy -O binary``, ``nm`` for the entry points; real-kvm.md) and cached under a directory
keyed by the SHA-256 of the source, so a second build is a file read.

>>> ok, why = binutils_available()
>>> img = build_guest() if ok else None
>>> img is None or (img.symbols["touch"] < len(img.code) and img.code[img.symbols["halt0"]] == 0xF4)
True
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from vepc.native import publish

__all__ = ["GuestImage", "build_guest", "binutils_available", "cache_dir", "GuestBuildError"]

_HERE = Path(__file__).resolve().parent
_TOOLS = ("as", "objcopy", "nm")
#: Bound on each binutils step (seconds): nothing may hang CI.
TOOL_TIMEOUT = 60


class GuestBuildError(RuntimeError):
    """``as``/``objcopy``/``nm`` missing or failed."""


@dataclass(frozen=True)
class GuestImage:
    """Flat binary of the ``.text`` section (position independent) and its global symbols (offsets)."""

    name: str
    code: bytes
    symbols: dict[str, int]
    source_hash: str

    def entry(self, symbol: str, load_addr: int) -> int:
        """Guest address of ``symbol`` when the image is loaded at ``load_addr``.

        Example: ``build_guest().entry("touch", 0x10000)`` → 0x10000."""
        try:
            return load_addr + self.symbols[symbol]
        except KeyError:
            raise GuestBuildError(f"guest program {self.name!r} has no symbol {symbol!r}") from None


def binutils_available() -> tuple[bool, str]:
    """``(True, "")`` when ``as``, ``objcopy`` and ``nm`` are on PATH, else ``(False, reason)``.

    >>> isinstance(binutils_available()[1], str)
    True
    """
    missing = [t for t in _TOOLS if shutil.which(t) is None]
    if missing:
        return False, "binutils not found: " + ", ".join(missing) + " (install binutils)"
    return True, ""


def cache_dir() -> Path:
    """``$VEPC_CACHE_DIR`` or ``<tmp>/vepc-realkvm-<uid>``: where built guest programs are kept.

    >>> cache_dir().name.startswith("vepc-realkvm") or "VEPC_CACHE_DIR" in os.environ
    True
    """
    env = os.environ.get("VEPC_CACHE_DIR")
    return Path(env) if env else Path(tempfile.gettempdir()) / f"vepc-realkvm-{os.getuid()}"


def _run(argv: list[str], cwd: str) -> str:
    try:
        done = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=TOOL_TIMEOUT, check=False)
    except FileNotFoundError:
        raise GuestBuildError(f"{argv[0]} not found (install binutils)") from None
    except subprocess.TimeoutExpired:
        raise GuestBuildError(f"{argv[0]} did not finish within {TOOL_TIMEOUT} s") from None
    if done.returncode:
        raise GuestBuildError(f"{' '.join(argv)} failed: {done.stderr.strip()}")
    return done.stdout


def build_guest(name: str = "guest", cache: Path | None = None) -> GuestImage:
    """Assemble ``guest/<name>.S`` (or return the cached build of the same source).

    >>> try:
    ...     build_guest("nonexistent")
    ... except GuestBuildError as e:
    ...     print(e)
    no guest program nonexistent.S
    """
    src = _HERE / f"{name}.S"
    if not src.is_file():
        raise GuestBuildError(f"no guest program {name}.S")
    text = src.read_bytes()
    digest = hashlib.sha256(b"as --64; objcopy -O binary -j .text; nm\0" + text).hexdigest()
    where = cache or cache_dir()
    bin_path = where / f"{name}-{digest[:20]}.bin"
    sym_path = where / f"{name}-{digest[:20]}.json"
    if bin_path.is_file() and sym_path.is_file():
        try:
            return GuestImage(name, bin_path.read_bytes(), json.loads(sym_path.read_text()), digest)
        except (OSError, ValueError):
            pass                                    # a damaged cache entry is rebuilt
    ok, why = binutils_available()
    if not ok:
        raise GuestBuildError(why)
    with tempfile.TemporaryDirectory(prefix="vepc-guest-") as tmp:
        obj = os.path.join(tmp, f"{name}.o")
        out = os.path.join(tmp, f"{name}.bin")
        _run(["as", "--64", "-o", obj, str(src)], tmp)
        _run(["objcopy", "-O", "binary", "-j", ".text", obj, out], tmp)
        symbols = {}
        for line in _run(["nm", "--defined-only", obj], tmp).splitlines():
            parts = line.split()
            if len(parts) == 3 and parts[1] in "Tt":
                symbols[parts[2]] = int(parts[0], 16)
        code = Path(out).read_bytes()
    publish(bin_path, code)
    publish(sym_path, json.dumps(symbols, sort_keys=True).encode())
    return GuestImage(name, code, symbols, digest)
