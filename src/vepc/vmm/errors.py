"""QEMU's error and warning lines, reproduced byte for byte.

Prefix convention (util/error-report.c ``vreport``/``print_loc``, util/qemu-error.c ``error_init``):

* outside a monitor, every report starts with the program name (``g_get_prgname()``, the basename of
  argv[0]) followed by ``": "``;
* then, if the report happens while QEMU's current *location* is a command-line option
  (``loc_set_cmdline``: during the option loop, or when ``qemu_opts_foreach`` restores an option's
  saved location, e.g. ``-numa``), the option and its argument joined by a space, then ``": "``;
  objects (``-object``) keep no location once parsed (vl.c ``ObjectOption`` has no ``Location``), so
  errors while *creating* them, and everything during machine init, carry no option prefix;
* warnings insert ``"warning: "`` after the location;
* an ``error_append_hint`` text is printed on the following line(s) (kept in ``.hint``).

QMP errors have none of that: the reply is ``{"error": {"class": "GenericError", "desc": MESSAGE}}``
(``QemuError.qmp``).

>>> e = QemuError("invalid option", location="-foo")
>>> str(e)
'qemu-system-x86_64: -foo: invalid option'
>>> e.message
'invalid option'
>>> str(QemuError("SGX is not enabled in KVM", qmp=True))
'SGX is not enabled in KVM'
>>> format_warning("host doesn't support requested feature: CPUID[eax=07h,ecx=00h].EBX.sgx [bit 2]")
"qemu-system-x86_64: warning: host doesn't support requested feature: CPUID[eax=07h,ecx=00h].EBX.sgx [bit 2]"
"""

from __future__ import annotations

from typing import Any

__all__ = ["PROGRAM_NAME", "QemuError", "format_warning", "format_error"]

#: ``g_get_prgname()`` of the modelled binary.
PROGRAM_NAME = "qemu-system-x86_64"


def format_error(message: str, location: str | None = None, *, warning: bool = False) -> str:
    """One report line as ``vreport`` prints it to stderr (no monitor), without the hint.

    >>> format_error("Duplicate ID 'm0' for object", "-object memory-backend-epc,id=m0,size=1M")
    "qemu-system-x86_64: -object memory-backend-epc,id=m0,size=1M: Duplicate ID 'm0' for object"
    """
    loc = f"{location}: " if location else ""
    kind = "warning: " if warning else ""
    return f"{PROGRAM_NAME}: {loc}{kind}{message}"


def format_warning(message: str, location: str | None = None) -> str:
    """A ``warn_report`` line: ``"qemu-system-x86_64: [LOC: ]warning: MESSAGE"``."""
    return format_error(message, location, warning=True)


class QemuError(ValueError):
    """A fatal QEMU error (what ``error_fatal``/``error_report`` + ``exit(1)`` print) or a QMP error.

    ``message`` is QEMU's raw message (``error_setg`` text), ``location`` the command-line option QEMU
    names before it (or ``None``), ``hint`` the ``error_append_hint`` text (or ``None``).  ``str()`` is
    the first line exactly as QEMU prints it; ``report`` adds the hint lines.

    ``vepc_only`` marks the few checks QEMU itself does not make (see their comments); their message
    is this model's own wording (the CLI prints it as ``vepc: MESSAGE`` and exits 2).  ``preface`` are
    the lines (warnings) QEMU printed before this error.

    >>> e = QemuError("Parameter 'size' expects a non-negative number below 2^64", location="-m 8GB",
    ...               hint="Optional suffix k, M, G, T, P or E means kilo-, mega-, giga-, tera-, peta-\\n"
    ...                    "and exabytes, respectively.\\n")
    >>> print(e.report)
    qemu-system-x86_64: -m 8GB: Parameter 'size' expects a non-negative number below 2^64
    Optional suffix k, M, G, T, P or E means kilo-, mega-, giga-, tera-, peta-
    and exabytes, respectively.
    """

    def __init__(self, message: str, *, location: str | None = None, hint: str | None = None,
                 qmp: bool = False, vepc_only: bool = False, error_class: str = "GenericError") -> None:
        self.message = message
        self.location = location
        self.hint = hint
        self.is_qmp = qmp
        self.vepc_only = vepc_only
        self.error_class = error_class
        self.preface: list[str] = []
        super().__init__(self.__str__())

    def __str__(self) -> str:
        if self.is_qmp:
            return self.message
        return format_error(self.message, self.location)

    @property
    def report(self) -> str:
        """Everything QEMU writes to stderr for this error: the line plus any hint (no trailing newline)."""
        text = str(self)
        if self.hint and not self.is_qmp:
            text += "\n" + self.hint.rstrip("\n")
        return "\n".join([*self.preface, text])

    @property
    def qmp(self) -> dict[str, Any]:
        """The QMP error object: ``{"class": ..., "desc": message}``."""
        return {"class": self.error_class, "desc": self.message}
