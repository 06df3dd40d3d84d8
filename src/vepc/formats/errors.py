"""The one error type of :mod:`vepc.formats`: a bad input file, named, with a one-line problem.

The command line prints it as ``vepc: PATH: problem`` and exits with status 2 (see ``vepc.cli``).

>>> e = FormatError("enclave.sgxs", "truncated stream: blob 3 at byte 192 has 10 of 64 bytes")
>>> str(e)
'enclave.sgxs: truncated stream: blob 3 at byte 192 has 10 of 64 bytes'
>>> isinstance(e, ValueError), e.path
(True, 'enclave.sgxs')
"""

from __future__ import annotations

import os

__all__ = ["FormatError"]


class FormatError(ValueError):
    """A file (or option value) that is not what it should be.

    ``path`` names the input (a file path, ``<bytes>`` or an option such as ``--xfrm``); ``problem`` is one line
    saying what is wrong and, for streams, where (blob index and byte offset).
    """

    def __init__(self, path: str | os.PathLike[str], problem: str) -> None:
        self.path = os.fspath(path)
        # One line, always: the CLI prints exactly one line per error.
        self.problem = " ".join(str(problem).split())
        super().__init__(self.path, self.problem)

    def __str__(self) -> str:
        return f"{self.path}: {self.problem}"

    @classmethod
    def from_os_error(cls, path: str | os.PathLike[str], err: OSError) -> "FormatError":
        """``cannot read: No such file or directory`` and the like, from an :class:`OSError`."""
        return cls(path, f"cannot access: {err.strerror or err}")


def read_input(path) -> bytes:
    """The bytes of ``path``; a missing or unreadable file is a :class:`FormatError` naming it."""
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise FormatError.from_os_error(path, e) from None
