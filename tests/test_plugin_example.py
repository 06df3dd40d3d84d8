"""The pytest plugin: examples/test_my_vmm.py (a VMM project's tests) runs green through pytest, and the
plugin's pieces behave as documented."""

from __future__ import annotations

import os
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

import pytest

from vepc.pytest_plugin import assert_no_epc_leak, boot_host

ROOT = Path(__file__).resolve().parents[1]


def _pytest(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    plugin = [] if any(ep.name == "vepc" for ep in entry_points(group="pytest11")) else ["-p", "vepc.pytest_plugin"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *plugin, *args],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


def test_the_example_vmm_tests_pass_with_the_plugin(tmp_path):
    # Run from an empty folder, as another project would: only the installed plugin provides the fixtures.
    example = tmp_path / "test_my_vmm.py"
    example.write_text((ROOT / "examples" / "test_my_vmm.py").read_text())
    proc = _pytest(str(example), cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "5 passed" in proc.stdout


def test_a_leak_fails_the_users_test_with_a_clear_message(tmp_path):
    (tmp_path / "test_leaky.py").write_text(
        "import pytest\n"
        "@pytest.mark.sgx_host(epc=['8M@0'])\n"
        "def test_leaky(sgx_host, qemu_vm, assert_no_epc_leak):\n"
        "    qemu_vm('-m 1G -accel kvm -cpu host -object memory-backend-epc,id=m0,size=4M,prealloc=on '\n"
        "            '-M sgx-epc.0.memdev=m0,sgx-epc.0.node=0', name='web')\n"
        "    assert_no_epc_leak()\n"
        "@pytest.mark.sgx_host(epc=['8M@0'], flavour='x')\n"
        "def test_bad_marker(sgx_host):\n"
        "    pass\n")
    proc = _pytest(str(tmp_path / "test_leaky.py"), cwd=tmp_path)
    assert proc.returncode == 1
    assert "VM web is still running (its QEMU process holds 1024 EPC pages)" in proc.stdout
    assert "unknown argument 'flavour'" in proc.stdout


def test_assert_no_epc_leak_names_what_is_left():
    host = boot_host(["8M@0"])
    app = host.kernel.spawn("app")
    fd = app.open("/dev/sgx_vepc")
    app.touch(app.mmap(16384, fd=fd), 16384)
    with pytest.raises(AssertionError) as e:
        assert_no_epc_leak(host)
    assert str(e.value).splitlines() == ["EPC leak on the model host:", "  - process 1 (app) is still alive",
                                         "  - 4 of 2048 EPC pages are not free (0 poisoned): vepc 4"]
    app.exit()
    assert_no_epc_leak(host)


@pytest.mark.sgx_host(epc=["8M@0", "4M@1"], kernel="5.15", sgx2=False)
def test_the_marker_configures_the_host(sgx_host):
    assert [s.size for s in sgx_host.kernel.pool.sections] == [8 << 20, 4 << 20]
    assert sgx_host.kernel.vepc.has_remove_all is False
    assert sgx_host.processor.config.sgx2 is False
