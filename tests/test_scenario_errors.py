"""Bad input: one line naming the file, the step index and the problem; exit status 2; no traceback."""

from __future__ import annotations


import pytest
from click.testing import CliRunner

from vepc.cli import cli

VM = ('[[vm]]\nname = "web"\nqemu = "-m 1G -accel kvm -cpu host -object memory-backend-epc,id=m0,size=4M '
      '-M sgx-epc.0.memdev=m0,sgx-epc.0.node=0"\n')

CASES = {
    "malformed_toml": ('[host\nepc = ["8M@0"]\n', "line 1, column 6: malformed TOML: Expected ']'"),
    "malformed_in_step": (VM + '[[step]]\ndo = "start"\n[[step]]\ndo = "kill"\nvm = web\n',
                          "step 2 (line 8, column 6): malformed TOML: Invalid value"),
    "unknown_step": (VM + '[[step]]\ndo = "start"\nvm = "web"\n[[step]]\ndo = "reboot"\nvm = "web"\n',
                     "step 2: unknown step 'reboot' (expected one of: start, shutdown, kill, reset, enclave, "
                     "destroy, touch, pressure, limit, balloon, expect)"),
    "bad_qemu": ('[[vm]]\nname = "web"\nqemu = "-m 8GB -object memory-backend-epc,id=m0,size=4M"\n',
                 "[[vm]] 'web': qemu-system-x86_64: -m 8GB: Parameter 'size' expects a non-negative number "
                 "below 2^64"),
    "unknown_vm": (VM + '[[step]]\ndo = "start"\nvm = "db"\n', "step 1: unknown VM 'db' (declared: 'web')"),
    "missing_sgxs": ('[[step]]\ndo = "enclave"\nname = "e1"\nsgxs = "nope.sgxs"\nsig = "nope.sig"\n',
                     "step 1: sgxs: {dir}/nope.sgxs: cannot access: No such file or directory"),
    "unknown_key": ('[[step]]\ndo = "touch"\nsize = "4M"\nsise = 1\n',
                    "step 1: unknown key 'sise' for a 'touch' step (expected: cgroup, do, expect_error, name, note, size, "
                    "vm)"),
    "bad_size": ('[[step]]\ndo = "pressure"\nsize = "8MB"\n',
                 "step 1: size: invalid size '8MB' (a number with an optional K, M, G or T suffix)"),
    "destroy_unknown": ('[[step]]\ndo = "destroy"\nname = "ghost"\n',
                        "step 1: unknown enclave 'ghost' (no earlier step creates it)"),
    "bad_state": (VM + '[[step]]\ndo = "expect"\nvm = "web"\nstate = "paused"\n',
                  "step 1: state must be one of running, stopped, failed, not 'paused'"),
    "start_without_vm": ('[[step]]\ndo = "start"\n', "step 1: a 'start' step needs 'vm'"),
    "bad_host_epc": ('[host]\nepc = ["64X@0"]\n', "[host]: invalid EPC section '64X@0'"),
    "host_without_sgx": ('[host]\nepc = ["8M@0"]\nflc = false\nkvm = false\n',
                         "[host]: the host kernel cannot use SGX"),
    "kernel_as_float": ('[host]\nkernel = 5.15\n', "[host]: kernel = 5.15: write the version as a string"),
    # EPC cgroups
    "cgroup_relative": ('[[cgroup]]\npath = "vms"\n', "[[cgroup]] 1: cgroup path 'vms' must be absolute"),
    "cgroup_root": ('[[cgroup]]\npath = "/"\nepc_max = "8M"\n', "[[cgroup]] 1: cgroup \"/\" is the root"),
    "cgroup_dotdot": ('[[cgroup]]\npath = "/a/../b"\n', "[[cgroup]] 1: cgroup path '/a/../b': invalid name '..'"),
    "cgroup_twice": ('[[cgroup]]\npath = "/a"\n[[cgroup]]\npath = "/a/"\n', "[[cgroup]]: cgroup '/a' is declared twice"),
    "cgroup_bad_max": ('[[cgroup]]\npath = "/a"\nepc_max = "lots"\n', "[[cgroup]] 1: epc_max: invalid size 'lots'"),
    "vm_epc_max_without_cgroup": (VM + 'epc_max = "8M"\n', "[[vm]] 'web': 'epc_max' limits the VM's cgroup"),
    "cgroup_but_series_off": ('[host]\nepc_cgroup = false\n' + VM + 'cgroup = "/vms/web"\n',
                              "[host]: epc_cgroup = false, but [[vm]] 'web' uses an EPC cgroup"),
    "limit_without_max": ('[[step]]\ndo = "limit"\ncgroup = "/a"\n', "step 1: a 'limit' step needs 'epc_max'"),
    "guest_touch_cgroup": (VM + '[[step]]\ndo = "touch"\nvm = "web"\nsize = "1M"\ncgroup = "/a"\n',
                           "step 1: 'cgroup' places a host process"),
    "expect_cgroup_nothing": ('[[step]]\ndo = "expect"\ncgroup = "/a"\nnote = "x"\n',
                              "step 1: 'cgroup' needs a check: epc_current_bytes, epc_peak_bytes or epc_max_events"),
    "expect_current_without_cgroup": ('[[step]]\ndo = "expect"\nepc_current_bytes = 0\n',
                                      "step 1: 'epc_current_bytes' is a cgroup's: add cgroup"),
    "bad_events": ('[[step]]\ndo = "expect"\ncgroup = "/a"\nepc_max_events = -1\n',
                   "step 1: epc_max_events must be a count"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_is_one_line_with_file_step_and_problem_and_exit_2(tmp_path, case):
    text, expected = CASES[case]
    path = tmp_path / f"{case}.toml"
    path.write_text(text)
    result = CliRunner().invoke(cli, ["run", str(path)])
    assert result.exit_code == 2
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"vepc: {path}: ")
    assert expected.format(dir=tmp_path) in lines[0]
    assert "Traceback" not in result.stderr
    assert isinstance(result.exception, SystemExit)


def test_missing_scenario_file(tmp_path):
    result = CliRunner().invoke(cli, ["run", str(tmp_path / "absent.toml")])
    assert result.exit_code == 2
    assert result.stderr == f"vepc: {tmp_path / 'absent.toml'}: no such file\n"


def test_unwritable_output_is_exit_2(tmp_path):
    path = tmp_path / "s.toml"
    path.write_text('[host]\nepc = ["4M@0"]\n')
    result = CliRunner().invoke(cli, ["run", str(path), "--trace", str(tmp_path / "no" / "t.json"), "-q"])
    assert result.exit_code == 2
    assert result.stderr == f"vepc: {tmp_path / 'no' / 't.json'}: cannot write: No such file or directory\n"


def test_quiet_and_verbose_exclude_each_other(tmp_path):
    path = tmp_path / "s.toml"
    path.write_text("")
    result = CliRunner().invoke(cli, ["-q", "run", str(path), "-v"])
    assert result.exit_code == 2 and "exclude each other" in result.stderr


def test_every_command_has_help_with_an_example():
    from vepc.cli import _register_extensions

    _register_extensions()
    for name in ("run", "demo"):
        result = CliRunner().invoke(cli, [name, "--help"])
        assert result.exit_code == 0 and "Example" in result.stdout
    top = CliRunner().invoke(cli, ["--help"])
    assert "_VEPC_COMPLETE=bash_source vepc" in top.stdout


def test_shell_completion_completes_commands_and_options():
    from vepc.cli import _register_extensions

    _register_extensions()
    env = {"_VEPC_COMPLETE": "bash_complete", "COMP_WORDS": "vepc run --che", "COMP_CWORD": "2"}
    result = CliRunner().invoke(cli, [], env=env, prog_name="vepc")
    assert "--check-every-step" in result.stdout
