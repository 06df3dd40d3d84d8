"""``vepc sgxs measure|sign`` and ``vepc sigstruct show`` (vepc.cli_formats), on a throwaway click group.

Contract (vepc.cli): bad input → exactly one line ``vepc: PATH: problem`` on stderr, exit status 2, no traceback.
"""

from __future__ import annotations

import json

import click
import pytest
from click.testing import CliRunner
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from vepc.cli_formats import register
from vepc.formats import DESCRIBE_KEYS, generate_signing_key, measure, read_sigstruct, verify_signature

TEST_ENCLAVE_MRENCLAVE = "784acfd7d5096a8f0fbd3265760bff21b120f62407a9a9e5ba31aa3c8ed198fc"
TEST_ENCLAVE_MRSIGNER = "fb4bab3d6036ac1d730fa83d7366df1dd2dfeac194ef335d6854d8a6c6475542"


@pytest.fixture(scope="module")
def app() -> click.Group:
    group = click.Group("vepc")
    register(group)
    return group


def run(app, *args: str):
    return CliRunner().invoke(app, [str(a) for a in args])


def pem(path, key):
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                                       serialization.NoEncryption()))
    return path


@pytest.fixture(scope="module")
def key_pem(tmp_path_factory):
    return pem(tmp_path_factory.mktemp("keys") / "key.pem", generate_signing_key())


def assert_bad_input(result, path) -> str:
    """Exit 2, nothing on stdout, one stderr line naming ``path``, no traceback."""
    assert result.exit_code == 2, result.output
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"vepc: {path}: ")
    assert "Traceback" not in result.stderr
    return lines[0]


# --- good paths --------------------------------------------------------------------------------------------


def test_measure_prints_mrenclave_on_one_line(app, vectors):
    result = run(app, "sgxs", "measure", vectors / "test_enclave.sgxs")
    assert result.exit_code == 0
    assert result.stdout == TEST_ENCLAVE_MRENCLAVE + "\n"


def test_sign_writes_a_sigstruct_that_verifies(app, vectors, key_pem, tmp_path):
    out = tmp_path / "report.sig"
    result = run(app, "sgxs", "sign", vectors / "report.sgxs", "--key", key_pem, "-o", out)
    assert result.exit_code == 0, result.output
    sig = read_sigstruct(out)
    assert sig.enclavehash == measure(vectors / "report.sgxs")
    assert verify_signature(sig)
    assert (sig.attributes, sig.xfrm, sig.isvprodid, sig.isvsvn) == (0x4, 0x3, 0, 0)


def test_sign_options_and_debug_flag_set_the_body(app, vectors, key_pem, tmp_path):
    out = tmp_path / "dbg.sig"
    result = run(app, "sgxs", "sign", vectors / "report.sgxs", "--key", key_pem, "-o", out, "--debug",
                 "--xfrm", "0x7", "--isvprodid", "12", "--isvsvn", "0x3")
    assert result.exit_code == 0, result.output
    sig = read_sigstruct(out)
    assert (sig.attributes, sig.xfrm, sig.isvprodid, sig.isvsvn) == (0x6, 0x7, 12, 3)
    assert verify_signature(sig)


def test_sign_attributes_option_is_hex_and_debug_adds_bit_1(app, vectors, key_pem, tmp_path):
    out = tmp_path / "a.sig"
    assert run(app, "sgxs", "sign", vectors / "report.sgxs", "--key", key_pem, "-o", out,
               "--attributes", "14", "--debug").exit_code == 0
    assert read_sigstruct(out).attributes == 0x16


def test_show_prints_every_field_mrsigner_and_validity(app, vectors):
    result = run(app, "sigstruct", "show", vectors / "test_enclave.sig")
    assert result.exit_code == 0
    fields = {line.split()[0]: line.split(None, 1)[1] for line in result.stdout.splitlines()}
    for name in ("header1", "vendor", "date", "header2", "swdefined", "modulus", "exponent", "signature",
                 "miscselect", "misc_mask", "attributes", "xfrm", "attributes_mask", "xfrm_mask", "enclavehash",
                 "isvprodid", "isvsvn", "q1", "q2", "mrsigner", "signature_valid"):
        assert name in fields
    assert fields["mrsigner"] == TEST_ENCLAVE_MRSIGNER
    assert fields["enclavehash"] == TEST_ENCLAVE_MRENCLAVE
    assert fields["signature_valid"] == "yes"
    assert fields["attributes_mask"] == "fdffffffffffffff"


def test_show_json_is_exactly_one_object_with_the_documented_keys(app, vectors):
    result = run(app, "sigstruct", "show", vectors / "test_enclave.sig", "--json")
    assert result.exit_code == 0
    obj = json.loads(result.stdout)
    assert tuple(obj) == DESCRIBE_KEYS
    assert obj["mrsigner"] == TEST_ENCLAVE_MRSIGNER and obj["enclavehash"] == TEST_ENCLAVE_MRENCLAVE
    assert obj["attributes_mask"] == "fdffffffffffffff" and obj["isvprodid"] == 0xFFFF
    assert obj["signature_valid"] is True
    # the numbers beside the little-endian bytes, with the bits named (asm/sgx.h, enum xfeature)
    assert (obj["attributes_flags"], obj["attributes_names"]) == (4, ["MODE64BIT"])
    assert (obj["xfrm_value"], obj["xfrm_names"]) == (3, ["FP", "SSE"])


def test_show_reports_a_tampered_q1_as_not_valid(app, vectors, tmp_path):
    raw = bytearray((vectors / "test_enclave.sig").read_bytes())
    raw[1040] ^= 1
    path = tmp_path / "q1.sig"
    path.write_bytes(bytes(raw))
    text = run(app, "sigstruct", "show", path).stdout
    assert "signature_valid  NO (q1 wrong)" in text
    assert json.loads(run(app, "sigstruct", "show", path, "--json").stdout)["signature_valid"] is False


@pytest.mark.parametrize("args", [["sgxs"], ["sgxs", "measure"], ["sgxs", "sign"], ["sigstruct"],
                                  ["sigstruct", "show"]])
def test_every_command_help_has_an_example(app, args):
    result = run(app, *args, "--help")
    assert result.exit_code == 0 and "Example" in result.stdout


# --- bad inputs --------------------------------------------------------------------------------------------


@pytest.fixture
def bad_files(vectors, tmp_path):
    sgxs = (vectors / "test_enclave.sgxs").read_bytes()
    sig = (vectors / "test_enclave.sig").read_bytes()
    group = 64 + 16 * 320
    files = {
        "truncated.sgxs": sgxs[:-7],
        "unknown.sgxs": sgxs[:64] + b"BOGUSTAG" + sgxs[72:],
        "order.sgxs": sgxs[:64] + sgxs[64 + group:64 + 2 * group] + sgxs[64:64 + group] + sgxs[64 + 2 * group:],
        "short.sig": sig[:1807],
        "header.sig": b"\x07" + sig[1:],
    }
    for name, raw in files.items():
        (tmp_path / name).write_bytes(raw)
    return tmp_path


@pytest.mark.parametrize("name, needle", [("truncated.sgxs", "truncated stream"), ("unknown.sgxs", "unknown tag"),
                                          ("order.sgxs", "EADD offsets must increase"),
                                          ("missing.sgxs", "cannot access")])
def test_measure_of_bad_sgxs_exits_2_with_one_line(app, bad_files, name, needle):
    path = bad_files / name
    assert needle in assert_bad_input(run(app, "sgxs", "measure", path), path)


@pytest.mark.parametrize("name, needle", [("short.sig", "1808 bytes, this is 1807"), ("header.sig", "wrong header1"),
                                          ("missing.sig", "cannot access")])
@pytest.mark.parametrize("as_json", [False, True])
def test_show_of_bad_sigstruct_exits_2_with_one_line(app, bad_files, name, needle, as_json):
    path = bad_files / name
    args = ["sigstruct", "show", path] + (["--json"] if as_json else [])
    assert needle in assert_bad_input(run(app, *args), path)


def test_sign_of_bad_sgxs_exits_2_naming_the_sgxs(app, bad_files, key_pem):
    path = bad_files / "unknown.sgxs"
    assert_bad_input(run(app, "sgxs", "sign", path, "--key", key_pem, "-o", bad_files / "o.sig"), path)
    assert not (bad_files / "o.sig").exists()


def test_sign_with_2048_bit_key_exits_2_naming_the_key(app, vectors, tmp_path):
    path = pem(tmp_path / "k2048.pem", rsa.generate_private_key(public_exponent=3, key_size=2048))
    line = assert_bad_input(run(app, "sgxs", "sign", vectors / "report.sgxs", "--key", path, "-o", tmp_path / "o"),
                            path)
    assert "RSA-2048" in line


def test_sign_with_exponent_65537_key_exits_2_naming_the_key(app, vectors, key_pem, tmp_path):
    key = serialization.load_pem_private_key(key_pem.read_bytes(), None)
    p, q = key.private_numbers().p, key.private_numbers().q
    d = pow(65537, -1, (p - 1) * (q - 1))
    other = rsa.RSAPrivateNumbers(p, q, d, d % (p - 1), d % (q - 1), pow(q, -1, p),
                                  rsa.RSAPublicNumbers(65537, p * q)).private_key()
    path = pem(tmp_path / "e65537.pem", other)
    line = assert_bad_input(run(app, "sgxs", "sign", vectors / "report.sgxs", "--key", path, "-o", tmp_path / "o"),
                            path)
    assert "exponent 65537" in line


@pytest.mark.parametrize("option, value", [("--xfrm", "zz"), ("--attributes", "0xg1"), ("--isvprodid", "ten"),
                                           ("--isvsvn", "70000"), ("--xfrm", "1" * 17)])
def test_sign_with_bad_option_value_exits_2_naming_the_option(app, vectors, key_pem, tmp_path, option, value):
    result = run(app, "sgxs", "sign", vectors / "report.sgxs", "--key", key_pem, "-o", tmp_path / "o.sig",
                 option, value)
    assert_bad_input(result, option)
    assert not (tmp_path / "o.sig").exists()


def test_sign_to_unwritable_output_exits_2_naming_it(app, vectors, key_pem, tmp_path):
    out = tmp_path / "no-such-dir" / "o.sig"
    assert "cannot access" in assert_bad_input(
        run(app, "sgxs", "sign", vectors / "report.sgxs", "--key", key_pem, "-o", out), out)
