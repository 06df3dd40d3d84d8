"""`vepc qemu`: boot a VM from QEMU options on a described host; print info sgx and CPUID 0x12."""

from __future__ import annotations

import json

from cliutil import vepc

ARGS = ["-m", "2G", "-accel", "kvm", "-cpu", "host", "-object", "memory-backend-epc,id=m0,size=64M,prealloc=on",
        "-M", "sgx-epc.0.memdev=m0,sgx-epc.0.node=0"]


def test_qemu_prints_info_sgx_and_the_guest_cpuid():
    r = vepc("qemu", "--host-epc", "128M@0", "--", *ARGS)
    assert r.returncode == 0, r.stderr
    assert "NUMA node #0: size=67108864" in r.stdout
    assert "0x00000012 0x02: eax=0x00000001 ebx=0x00000001 ecx=0x04000001 edx=0x00000000" in r.stdout
    assert "sgx: EPC section 0x100000000-0x103ffffff" in r.stdout


def test_qemu_json_has_the_qmp_objects_and_cpuid():
    r = vepc("qemu", "--host-epc", "64M@0,64M@1", "--json", "--", *ARGS)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["query-sgx"]["sections"] == [{"node": 0, "size": 64 << 20}]
    assert out["query-sgx-capabilities"]["sections"] == [{"node": 0, "size": 64 << 20}, {"node": 1, "size": 64 << 20}]
    assert {"leaf": "0x12", "subleaf": 3, "eax": "0x00000000", "ebx": "0x00000000", "ecx": "0x00000000",
            "edx": "0x00000000"} in out["cpuid"]
    assert out["epc_committed_bytes"] == 64 << 20


def test_qemu_bad_options_print_qemus_line_and_exit_1_as_qemu_does():
    r = vepc("qemu", "--host-epc", "128M@0", "--", "-m", "2G", "-object", "memory-backend-epc,id=m0,size=0",
             "-M", "sgx-epc.0.memdev=m0,sgx-epc.0.node=0")
    assert r.returncode == 1
    assert r.stderr.strip().splitlines() == [
        "qemu-system-x86_64: property 'size' of memory-backend-epc doesn't take value '0'"]
    assert "Traceback" not in r.stderr


def test_qemu_model_only_refusal_is_one_vepc_line_and_exit_2():
    r = vepc("qemu", "--strict", "--", "-m", "2G", "-accel", "kvm", "-cpu", "host", "-display", "none")
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        "vepc: --strict: -display is accepted by QEMU but not modelled (it does not touch SGX)"]


def test_kvm_run_efault_stops_the_vm_with_qemus_line_and_no_traceback():
    # more guest EPC than the host has, no prealloc: the guest's EPC sanitizing touches a page the host
    # cannot back -> vepc fault SIGBUS -> KVM_RUN -EFAULT (kvm-all.c kvm_cpu_exec: "error: kvm run failed")
    r = vepc("qemu", "--host-epc", "8M@0", "--", "-m", "1G", "-accel", "kvm", "-cpu", "host",
             "-object", "memory-backend-epc,id=m0,size=16M", "-M", "sgx-epc.0.memdev=m0,sgx-epc.0.node=0")
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert "error: kvm run failed Bad address" in r.stderr.splitlines()
    assert "VM stopped: internal-error" in r.stdout


def test_qemu_prealloc_beyond_the_host_fails_with_qemus_message():
    r = vepc("qemu", "--host-epc", "32M@0", "--", *ARGS)
    assert r.returncode == 1
    assert "qemu_prealloc_mem: preallocating memory failed: Bad address" in r.stderr


def test_qemu_bad_host_epc_is_one_line_exit_2():
    r = vepc("qemu", "--host-epc", "64Q@0", "--", *ARGS)
    assert r.returncode == 2 and r.stderr.startswith("vepc: --host-epc:") and "Traceback" not in r.stderr


def test_a_bad_host_kernel_is_one_line_naming_host_kernel():
    r = vepc("qemu", "--host-kernel", "rfc-v3", "--", *ARGS)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.strip() == ("vepc: --host-kernel: invalid kernel version 'rfc-v3' (expected MAJOR.MINOR, "
                                "e.g. 6.8 or 5.15, or a profile: rfc-v2)")


def test_the_seed_profile_host_serves_qemu_through_sgx_virt_epc():
    r = vepc("qemu", "--host-kernel", "rfc-v2", "--host-epc", "128M@0", "--", *ARGS)
    assert r.returncode == 0, r.stderr
    assert "sgx: EPC section 0x100000000-0x103ffffff" in r.stdout


# -- --cgroup / --epc-max (the EPC cgroup series on the host) ------------------------------------------------
EPC32 = ["-m", "1G", "-accel", "kvm", "-cpu", "host", "-object", "memory-backend-epc,id=m0,size=32M,prealloc=on",
         "-M", "sgx-epc.0.memdev=m0,sgx-epc.0.node=0"]


def test_qemu_in_a_cgroup_below_its_epc_fails_prealloc_and_names_the_max_event():
    r = vepc("qemu", "--cgroup", "/vms/web", "--epc-max", "16M", "--", *EPC32)
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert lines[0] == "qemu-system-x86_64: qemu_prealloc_mem: preallocating memory failed: Bad address"
    assert lines[1].startswith("vepc: host cgroup /vms/web: misc.events sgx_epc.max 1")


def test_qemu_in_a_cgroup_reports_its_misc_current_and_max():
    r = vepc("qemu", "--json", "--cgroup", "/vms/web", "--epc-max", "64M", "--", *EPC32)
    assert r.returncode == 0, r.stderr
    cg = json.loads(r.stdout)["cgroup"]
    assert (cg["path"], cg["current"], cg["max"], cg["events_max"]) == ("/vms/web", 32 << 20, 64 << 20, 0)


def test_qemu_cgroup_options_refuse_bad_input_in_one_line():
    for args, msg in ((["--epc-max", "64M"], "vepc: --epc-max limits QEMU's cgroup: add --cgroup PATH"),
                      (["--cgroup", "vms"], "vepc: --cgroup: cgroup path 'vms' must be absolute"),
                      (["--cgroup", "/"], "vepc: --cgroup: \"/\" is the root cgroup"),
                      (["--cgroup", "/v", "--epc-max", "6Q"], "vepc: --epc-max: invalid size '6Q'")):
        r = vepc("qemu", *args, "--", *EPC32)
        assert r.returncode == 2 and r.stderr.startswith(msg) and len(r.stderr.splitlines()) == 1, (args, r.stderr)
