"""The bad-input corpus (tests/corpus/): every malformed SGXS, SIGSTRUCT, QEMU option string and scenario
file gives the documented error -- one line on stderr, exit status 2, no traceback -- through the command
line (``vepc sgxs measure``, ``vepc sigstruct show``, ``vepc qemu -- ARGS``, ``vepc run``); every malformed
ioctl argument gives the errno Linux documents for it (ioctl/*.json, run on the model's processes).

QEMU option strings follow QEMU's own convention instead: QEMU's lines on stderr and exit status 1 for what
QEMU refuses, one ``vepc:`` line and exit 2 for what only the model refuses.

The expected messages are in tests/corpus/manifest.toml; a corpus file without an entry (or an entry
without its file) fails the walk, so the corpus and its documentation cannot drift apart.
"""

from __future__ import annotations

import errno
import json
import shlex
import struct
import tomllib
from pathlib import Path

import pytest
from click.testing import CliRunner

from vepc import cli as vcli
from vepc.arch.structs import Secinfo, Secs
from vepc.kernel import ioctl_numbers
from vepc.kernel.invariants import check
from vepc.kernel.mm import MAP_ANONYMOUS, MAP_PRIVATE
from vepc.machine import Machine

CORPUS = Path(__file__).resolve().parent / "corpus"
MANIFEST = tomllib.loads((CORPUS / "manifest.toml").read_text())
COMMANDS = {"sgxs": ["sgxs", "measure"], "sigstruct": ["sigstruct", "show"], "qemu": None, "scenario": ["run"]}


def _cases():
    for sub in COMMANDS:
        for f in sorted((CORPUS / sub).iterdir()):
            yield pytest.param(sub, f, id=f"{sub}/{f.name}")


@pytest.fixture(scope="module")
def cli():
    register = getattr(vcli, "_register_extensions", None)
    if register is not None:
        register()
    return vcli.cli


def test_manifest_and_corpus_agree():
    for sub in COMMANDS:
        files = {f.name for f in (CORPUS / sub).iterdir()}
        documented = set(MANIFEST.get(sub, {}))
        assert files - documented == set(), f"corpus files in {sub}/ without a documented error"
        assert documented - files == set(), f"manifest entries in [{sub}] without a file"
    assert len(list((CORPUS / "ioctl").glob("*.json"))) >= 30


def qemu_cli_args(text: str) -> list[str]:
    """A qemu corpus file: QEMU's argv, or ``VEPC-OPTIONS -- ARGV``; ``--host-epc 64M@0`` unless given."""
    toks = shlex.split(text)
    opts, qargs = (toks[:toks.index("--")], toks[toks.index("--") + 1:]) if "--" in toks else ([], toks)
    host = [] if "--host-epc" in opts else ["--host-epc", "64M@0"]
    return ["qemu", *host, *opts, "--", *qargs]


@pytest.mark.parametrize("sub,path", list(_cases()))
def test_bad_input_gives_the_documented_error_and_no_traceback(cli, sub, path):
    if COMMANDS[sub] is None:
        # QEMU's own refusals: QEMU's lines (warnings, error, hint) and exit 1; the model's: one line, exit 2
        args = qemu_cli_args(path.read_text())
        want = MANIFEST[sub][path.name].splitlines()
        status = 2 if want[0].startswith("vepc: ") else 1
    else:
        args = [*COMMANDS[sub], str(path)]
        want = [f"vepc: {path}: " + MANIFEST[sub][path.name].format(dir=path.parent)]
        status = 2
    res = CliRunner().invoke(cli, args)
    stderr = res.stderr
    assert "Traceback" not in stderr + res.stdout
    assert isinstance(res.exception, SystemExit) or res.exception is None, repr(res.exception)
    assert res.exit_code == status, (res.exit_code, stderr)
    assert stderr.splitlines() == want


def test_qemu_corpus_has_at_least_60_bad_option_strings():
    assert len(MANIFEST["qemu"]) >= 60


# -- ioctl arguments -----------------------------------------------------------------------------------------
class _Ctx:
    """One process with the device open, the setup done, and the buffers an argument may point to."""

    def __init__(self, case: dict) -> None:
        self.m = Machine.build(epc=["1M@0"], kernel_version=case.get("kernel", "6.8"))
        self.k = self.m.kernel
        self.p = self.k.spawn("corpus")
        self.case = case
        self.fd = self.p.open(case["device"])
        self.vepc_fd = self.p.open("/dev/sgx_vepc")
        self.page = self.buf(bytes(4096))
        size = 0x10000
        area = self.p.mmap(2 * size, flags=MAP_PRIVATE | MAP_ANONYMOUS)
        self.base = (area + size - 1) & ~(size - 1)
        self.p.munmap(area, 2 * size)
        # Far from every mapping: nothing is ever mapped there.
        self.unmapped = 0x10000000

    def buf(self, data: bytes) -> int:
        return self.p.alloc_user(data)

    def secs(self, spec: dict) -> int:
        s = Secs(size=spec["size"], base=spec.get("base", self.base), ssa_frame_size=spec["ssa_frame_size"],
                 attributes=spec["attributes"], xfrm=spec["xfrm"])
        return self.buf(s.pack())

    def secinfo(self) -> int:
        reserved = b"\x01" + bytes(55) if self.case.get("secinfo_reserved") else bytes(56)
        return self.buf(Secinfo(flags=self.case.get("secinfo_flags", 0x203), reserved=reserved).pack())

    def sigstruct(self) -> int:
        raw = bytearray(1808)
        if self.case.get("sigstruct") == "vendor_1234":
            raw[16:20] = struct.pack("<I", 0x1234)
        return self.buf(bytes(raw))

    def value(self, field) -> int:
        if isinstance(field, int):
            return field
        name, _, off = field.partition("+")
        base = {"page": lambda: self.page, "unmapped": lambda: self.unmapped, "secinfo": self.secinfo,
                "sigstruct": self.sigstruct, "vepc_fd": lambda: self.vepc_fd,
                "secs": lambda: self.secs(self.case["secs"])}[name]()
        return base + (int(off, 0) if off else 0)

    def arg(self, spec) -> int:
        if isinstance(spec, dict):
            return self.buf(struct.pack(spec["struct"], *(self.value(f) for f in spec["fields"])))
        return self.value(spec)

    def setup(self) -> None:
        for step in self.case.get("setup", []):
            if step == "create":
                secs = self.secs({"size": 0x10000, "ssa_frame_size": 1, "attributes": 4, "xfrm": 3})
                self.p.ioctl(self.fd, ioctl_numbers.SGX_IOC_ENCLAVE_CREATE, self.buf(struct.pack("<Q", secs)))
            elif step == "add":
                si = self.buf(Secinfo(flags=0x203).pack())
                arg = self.buf(struct.pack("<6Q", self.page, 0, 4096, si, 1, 0))
                self.p.ioctl(self.fd, ioctl_numbers.SGX_IOC_ENCLAVE_ADD_PAGES, arg)
            else:
                raise ValueError(f"unknown setup step {step!r}")


@pytest.mark.parametrize("path", sorted((CORPUS / "ioctl").glob("*.json")), ids=lambda p: p.stem)
def test_bad_ioctl_argument_gives_the_documented_errno(path):
    case = json.loads(path.read_text())
    ctx = _Ctx(case)
    ctx.setup()
    cmd = case["cmd"] if isinstance(case["cmd"], int) else getattr(ioctl_numbers, case["cmd"])
    with pytest.raises(OSError) as e:
        ctx.p.ioctl(ctx.fd, cmd, ctx.arg(case["arg"]))
    assert e.value.errno == getattr(errno, case["errno"]), (case["description"], errno.errorcode.get(e.value.errno))
    assert ctx.p.alive                                   # a bad argument never kills the caller
    assert check(ctx.k, ctx.m.processor) == []
    ctx.p.exit()
    assert check(ctx.k, ctx.m.processor, idle=True) == []
