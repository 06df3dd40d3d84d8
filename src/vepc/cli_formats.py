"""``vepc sgxs ...`` and ``vepc sigstruct ...``: the command-line face of :mod:`vepc.formats`.

``register(cli)`` adds the two groups to the main ``vepc`` group. Every bad input (missing or unreadable file,
truncated or non-canonical SGXS, malformed SIGSTRUCT, unsuitable key, bad option value) prints one line
``vepc: PATH: problem`` on stderr and exits with status 2.

Example::

    vepc sgxs measure enclave.sgxs
    vepc sgxs sign enclave.sgxs --key key.pem -o enclave.sig --debug
    vepc sigstruct show enclave.sig --json
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from typing import Any

import click

from vepc.arch.constants import Attribute
from vepc.arch.structs import Sigstruct
from vepc.formats import (
    FormatError, describe, load_signing_key, measure, mrsigner, read_sigstruct, sign, signature_checks,
    write_sigstruct,
)

__all__ = ["register", "sgxs_group", "sigstruct_group"]

_U64 = (1 << 64) - 1
_U16 = (1 << 16) - 1


def _bad_input(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn a :class:`FormatError` into ``vepc: PATH: problem`` on stderr and exit status 2."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except FormatError as e:
            click.echo(f"vepc: {e}", err=True)
            raise click.exceptions.Exit(2) from None

    return wrapper


def _parse_int(option: str, text: str | None, *, limit: int, base: int) -> int | None:
    """``--xfrm 3`` / ``--xfrm 0x3`` (base 16) or ``--isvsvn 2`` / ``0x2`` (base 10 or 0x-prefixed)."""
    if text is None:
        return None
    t = text.strip().replace("_", "")
    try:
        if base == 16:
            value = int(t[2:] if t.lower().startswith("0x") else t, 16)
        else:
            value = int(t, 0)
    except ValueError:
        kind = "hexadecimal number" if base == 16 else "number"
        raise FormatError(option, f"not a {kind}: {text!r}") from None
    if not 0 <= value <= limit:
        raise FormatError(option, f"{text!r} is out of range 0..0x{limit:x}")
    return value


@click.group("sgxs")
def sgxs_group() -> None:
    """SGXS enclave images: measure and sign.

    \b
    Examples:
      vepc sgxs measure enclave.sgxs
      vepc sgxs sign enclave.sgxs --key key.pem -o enclave.sig
    """


@sgxs_group.command("measure")
@click.argument("file", metavar="FILE.sgxs")
@_bad_input
def sgxs_measure(file: str) -> None:
    """Print the MRENCLAVE of FILE.sgxs (lowercase hex, one line).

    The stream is checked for canonical form and re-measured block by block (ECREATE, EADD, EEXTEND) as the
    hardware does; for a plain SGXS file this equals its SHA-256.

    \b
    Example:
      vepc sgxs measure test_enclave.sgxs
      784acfd7d5096a8f0fbd3265760bff21b120f62407a9a9e5ba31aa3c8ed198fc
    """
    click.echo(measure(file).hex())


@sgxs_group.command("sign")
@click.argument("file", metavar="FILE.sgxs")
@click.option("--key", "key_path", required=True, metavar="KEY.pem",
              help="PEM RSA private key, 3072-bit, public exponent 3.")
@click.option("-o", "--output", required=True, metavar="OUT.sig", help="Where to write the SIGSTRUCT.")
@click.option("--attributes", metavar="HEX", default=None, help="SECS attributes (default 4 = MODE64BIT).")
@click.option("--xfrm", metavar="HEX", default=None, help="XFRM (default 3 = x87|SSE).")
@click.option("--isvprodid", metavar="N", default=None, help="ISV product id, 0..65535 (default 0).")
@click.option("--isvsvn", metavar="N", default=None, help="ISV security version, 0..65535 (default 0).")
@click.option("--debug", is_flag=True, help="Set the DEBUG attribute bit (0x2).")
@_bad_input
def sgxs_sign(file: str, key_path: str, output: str, attributes: str | None, xfrm: str | None,
              isvprodid: str | None, isvsvn: str | None, debug: bool) -> None:
    """Measure FILE.sgxs and write its SIGSTRUCT to OUT.sig.

    Signed like the kernel selftest signer and sgxs-sign: RSA-3072, exponent 3, PKCS#1 v1.5 over SHA-256 of
    header||body, modulus/signature/q1/q2 little-endian. Masks, miscselect, vendor and date are 0.

    \b
    Example:
      openssl genrsa -3 -out key.pem 3072
      vepc sgxs sign enclave.sgxs --key key.pem -o enclave.sig --isvprodid 1 --debug
    """
    kw = {
        "attributes": _parse_int("--attributes", attributes, limit=_U64, base=16),
        "xfrm": _parse_int("--xfrm", xfrm, limit=_U64, base=16),
        "isvprodid": _parse_int("--isvprodid", isvprodid, limit=_U16, base=10),
        "isvsvn": _parse_int("--isvsvn", isvsvn, limit=_U16, base=10),
    }
    kw = {k: v for k, v in kw.items() if v is not None}
    if debug:
        kw["attributes"] = kw.get("attributes", int(Attribute.MODE64BIT)) | int(Attribute.DEBUG)
    key = load_signing_key(key_path)
    mrenclave = measure(file)
    sig = sign(mrenclave, key, **kw)
    write_sigstruct(output, sig)
    click.echo(f"{output}: mrenclave {mrenclave.hex()} mrsigner {mrsigner(sig).hex()}")


@click.group("sigstruct")
def sigstruct_group() -> None:
    """SIGSTRUCT files: show and check.

    \b
    Example:
      vepc sigstruct show enclave.sig --json
    """


def _big(raw: bytes, full: bool) -> str:
    h = raw.hex()
    return h if full else f"{h[:16]}...{h[-16:]} ({len(raw)} bytes, little-endian)"


def _attr_names(value: int) -> str:
    names = [a.name for a in Attribute if value & a]
    rest = value & ~sum(int(a) for a in Attribute)
    if rest:
        names.append(f"0x{rest:x}")
    return "|".join(names) if names else "none"


def _show_lines(path: str, sig: Sigstruct, full: bool) -> list[tuple[str, str]]:
    d = describe(sig)
    checks = signature_checks(sig)
    bad = [k for k, ok in checks.items() if not ok]
    valid = "yes" if not bad else "NO (" + ", ".join(f"{k} wrong" for k in bad) + ")"
    return [
        ("file", path),
        ("header1", f"{sig.header1[0]:016x} {sig.header1[1]:016x}"),
        ("vendor", f"0x{sig.vendor:04x}"),
        ("date", d["date"]),
        ("header2", f"{sig.header2[0]:016x} {sig.header2[1]:016x}"),
        ("swdefined", f"0x{sig.swdefined:08x}"),
        ("modulus", _big(sig.modulus, full)),
        ("exponent", str(sig.exponent)),
        ("signature", _big(sig.signature, full)),
        ("miscselect", d["miscselect"]),
        ("misc_mask", d["misc_mask"]),
        ("attributes", f"{d['attributes']}  ({_attr_names(sig.attributes)})"),
        ("xfrm", d["xfrm"]),
        ("attributes_mask", d["attributes_mask"]),
        ("xfrm_mask", d["xfrm_mask"]),
        ("enclavehash", d["enclavehash"]),
        ("isvprodid", f"{sig.isvprodid} (0x{sig.isvprodid:04x})"),
        ("isvsvn", str(sig.isvsvn)),
        ("q1", _big(sig.q1, full)),
        ("q2", _big(sig.q2, full)),
        ("mrsigner", d["mrsigner"]),
        ("signature_valid", valid),
    ]


@sigstruct_group.command("show")
@click.argument("file", metavar="FILE.sig")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of aligned lines.")
@click.option("--full", is_flag=True, help="Print modulus, signature, q1 and q2 in full.")
@_bad_input
def sigstruct_show(file: str, as_json: bool, full: bool) -> None:
    """Print every field of FILE.sig, its MRSIGNER and whether the signature (and q1, q2) verifies.

    --json prints one object with the keys enclavehash, mrsigner, attributes, xfrm, attributes_mask,
    xfrm_mask, miscselect, misc_mask (hex of the little-endian bytes), isvprodid, isvsvn, vendor (ints),
    date (BCD yyyymmdd), signature_valid, and attributes_flags / xfrm_value (the numbers) with
    attributes_names / xfrm_names (their bits by name).

    \b
    Examples:
      vepc sigstruct show test_enclave.sig
      vepc sigstruct show test_enclave.sig --json
    """
    sig = read_sigstruct(file)
    if as_json:
        click.echo(json.dumps(describe(sig)))
        return
    lines = _show_lines(file, sig, full)
    width = max(len(k) for k, _ in lines)
    for k, v in lines:
        click.echo(f"{k:<{width}}  {v}")


def register(cli: click.Group) -> None:
    """Add the ``sgxs`` and ``sigstruct`` groups to ``cli``.

    >>> group = click.Group("vepc"); register(group); sorted(group.commands)
    ['sgxs', 'sigstruct']
    """
    cli.add_command(sgxs_group)
    cli.add_command(sigstruct_group)
