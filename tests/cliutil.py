"""Running ``vepc`` as a user does: a fresh interpreter, its exit status, stdout and stderr."""

from __future__ import annotations

import subprocess
import sys


def vepc(*args: str) -> subprocess.CompletedProcess:
    """``vepc ARGS...`` in a subprocess (``from vepc.cli import main; main()``), text output."""
    return subprocess.run([sys.executable, "-c", "from vepc.cli import main; main()", *map(str, args)],
                          capture_output=True, text=True, timeout=120)
