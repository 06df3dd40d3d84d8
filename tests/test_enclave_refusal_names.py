"""EINIT and ECREATE refusals name what the processor answered (issue [Seed]): Linux returns -EPERM for
any SGX code from EINIT and -EIO for a fault of ECREATE or EINIT (ioctl.c sgx_encl_init /
sgx_encl_create), logging the code only with pr_debug; the loader, the CLI, ``--json`` and the scenario
report (host and guest) name it: ``SGX_INVALID_MEASUREMENT``, ``#GP``."""

from __future__ import annotations

import errno
import json
from pathlib import Path

import pytest

from vepc.kernel.loader import EnclaveIoctlError, load_enclave
from vepc.machine import Machine
from vepc.scenario import Scenario
from vepc.scenario.runner import ScenarioRunner
from vepc.scenario.synthetic import synthetic_enclave

from cliutil import vepc

VECTORS = Path(__file__).resolve().parents[2] / "shared" / "vectors"
VM = ("-m 1G -accel kvm -cpu host -object memory-backend-epc,id=m0,size=4M,prealloc=on "
      "-M sgx-epc.0.memdev=m0,sgx-epc.0.node=0")


def other_sig(nbytes: int = 5 * 4096) -> bytes:
    """A valid SIGSTRUCT, but of another enclave's measurement."""
    return synthetic_enclave(nbytes + 4096)[1]


def test_einit_of_another_enclaves_sigstruct_is_eperm_naming_sgx_invalid_measurement():
    m = Machine.build(epc=["8M@0"])
    image, _ = synthetic_enclave(5 * 4096)
    with pytest.raises(EnclaveIoctlError) as e:
        load_enclave(m.kernel, m.kernel.spawn("app"), image, other_sig())
    assert e.value.errno == errno.EPERM and e.value.leaf == "EINIT"
    assert e.value.hardware == "SGX_INVALID_MEASUREMENT"
    assert "EINIT returned SGX_INVALID_MEASUREMENT" in e.value.strerror
    assert m.kernel.dmesg_lines("sgx: EINIT returned 4")                   # the kernel's pr_debug


def test_einit_with_a_bad_signature_names_sgx_invalid_signature():
    m = Machine.build(epc=["8M@0"])
    image, sig = synthetic_enclave(5 * 4096)
    bad = bytearray(sig)
    bad[0x210] ^= 1                                                        # in SIGSTRUCT.SIGNATURE (0x204..0x384)
    with pytest.raises(EnclaveIoctlError) as e:
        load_enclave(m.kernel, m.kernel.spawn("app"), image, bytes(bad))
    assert (e.value.errno, e.value.hardware) == (errno.EPERM, "SGX_INVALID_SIGNATURE")


def test_ecreate_fault_is_eio_naming_the_gp():
    # SDM ECREATE: XFRM[1:0] must be 11b, else #GP(0); sgx_encl_create turns the fault into -EIO
    m = Machine.build(epc=["8M@0"])
    image, sig = synthetic_enclave(5 * 4096)
    with pytest.raises(EnclaveIoctlError) as e:
        load_enclave(m.kernel, m.kernel.spawn("app"), image, sig, xfrm=0x1)
    assert (e.value.errno, e.value.leaf, e.value.hardware) == (errno.EIO, "ECREATE", "#GP")


def test_driver_refusals_carry_no_hardware_name():
    # sgx_encl_init: attributes beyond the allowed mask are -EACCES before any EINIT
    m = Machine.build(epc=["8M@0"])
    image, sig = synthetic_enclave(5 * 4096)
    from vepc.arch.constants import Attribute
    with pytest.raises(OSError) as e:
        load_enclave(m.kernel, m.kernel.spawn("app"), image, sig,
                     attributes=int(Attribute.MODE64BIT | Attribute.PROVISIONKEY))
    assert e.value.errno == errno.EACCES and not isinstance(e.value, EnclaveIoctlError)


def _scenario(tmp_path: Path, vm: bool) -> dict:
    image, _ = synthetic_enclave(5 * 4096)
    (tmp_path / "e.sgxs").write_bytes(image.to_bytes())
    (tmp_path / "wrong.sig").write_bytes(other_sig())
    where = 'vm = "g"\n' if vm else ""
    text = (f'[host]\nepc = ["16M@0"]\n[[vm]]\nname = "g"\nqemu = "{VM}"\n'
            '[[step]]\ndo = "start"\nvm = "g"\n'
            f'[[step]]\ndo = "enclave"\n{where}name = "e"\nsgxs = "e.sgxs"\nsig = "wrong.sig"\n'
            'expect_error = "SGX_INVALID_MEASUREMENT"\n')
    path = tmp_path / "s.toml"
    path.write_text(text)
    return ScenarioRunner(Scenario.load(str(path))).run().to_dict()


@pytest.mark.parametrize("in_guest", [False, True])
def test_scenario_report_names_the_sgx_code_on_the_host_and_in_a_guest(tmp_path, in_guest):
    doc = _scenario(tmp_path, in_guest)
    assert doc["ok"], doc["steps"]
    enclaves = doc["vms"][0]["enclaves"] if in_guest else doc["host_enclaves"]
    assert enclaves[0]["state"] == "failed"
    assert enclaves[0]["error"].startswith("EPERM (Operation not permitted)")
    assert enclaves[0]["error"].endswith("EINIT returned SGX_INVALID_MEASUREMENT")


@pytest.mark.skipif(not (VECTORS / "sig1.sigstruct.bin").exists(), reason=f"test vectors not found at {VECTORS}")
def test_cli_wrong_sigstruct_prints_sgx_invalid_measurement_and_exits_2():
    cmd = ["enclave", "load", VECTORS / "test_enclave.sgxs", "--sig", VECTORS / "sig1.sigstruct.bin"]
    r = vepc(*cmd)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.strip() == (f"vepc: {VECTORS / 'sig1.sigstruct.bin'}: EINIT rejected the SIGSTRUCT for this "
                                "image (SGX_IOC_ENCLAVE_INIT): EINIT returned SGX_INVALID_MEASUREMENT (EPERM)")
    r = vepc(*cmd, "--json")
    out = json.loads(r.stdout)
    assert r.returncode == 2 and out["ok"] is False
    assert (out["errno"], out["leaf"], out["sgx_code"]) == ("EPERM", "EINIT", "SGX_INVALID_MEASUREMENT")
