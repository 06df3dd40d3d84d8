"""The ``vepc`` command line.

Every command turns bad input into one line on stderr (``vepc: WHERE: problem``) and exit status 2.

Example::

    vepc demo
    vepc run examples/seed_story.toml --html story.html
    vepc sgxs measure enclave.sgxs

Shell completion (click's): ``eval "$(_VEPC_COMPLETE=bash_source vepc)"`` in ``~/.bashrc``
(``zsh_source``/``fish_source`` for zsh and fish).
"""

from __future__ import annotations

import sys
from typing import NoReturn

import click

from vepc import __version__

__all__ = ["main", "cli", "fail"]


def fail(message: str) -> NoReturn:
    """Print one clear line and exit with status 2 (bad input)."""
    click.echo(f"vepc: {message}", err=True)
    sys.exit(2)


def _verbosity(ctx: click.Context, quiet: bool, verbose: bool) -> tuple[bool, bool]:
    """A command's -q/-v combined with the group's (``vepc -q run ...`` and ``vepc run -q ...`` alike)."""
    obj = ctx.find_root().obj or {}
    quiet = quiet or obj.get("quiet", False)
    verbose = verbose or obj.get("verbose", False)
    if quiet and verbose:
        fail("--quiet and --verbose exclude each other")
    return quiet, verbose


_quiet_option = click.option("-q", "--quiet", is_flag=True, help="Print nothing but errors; the exit status tells.")
_verbose_option = click.option("-v", "--verbose", is_flag=True,
                               help="Also print event totals, kernel warnings and internal tracebacks.")


@click.group(context_settings={"help_option_names": ["-h", "--help"]},
             epilog="Shell completion: eval \"$(_VEPC_COMPLETE=bash_source vepc)\" (zsh_source, fish_source "
                    "for other shells).")
@click.version_option(__version__, prog_name="vepc")
@_quiet_option
@_verbose_option
@click.pass_context
def cli(ctx: click.Context, quiet: bool, verbose: bool) -> None:
    """vepc: the Linux SGX virtual EPC and the SGX virtualization stack, as an executable model.

    \b
    Examples:
      vepc demo
      vepc run examples/seed_story.toml --html story.html
      vepc sgxs measure enclave.sgxs
      vepc sigstruct show enclave.sig --json
    """
    ctx.obj = {"quiet": quiet, "verbose": verbose}


@cli.command("run")
@click.argument("file", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object (schema: docs/scenarios.md) instead "
                                                     "of the report.")
@click.option("--trace", type=click.Path(), metavar="OUT.json",
              help="Write a Chrome/Perfetto JSON trace (open it at ui.perfetto.dev).")
@click.option("--plot", type=click.Path(), metavar="OUT.png",
              help="Write a picture: EPC by owner over time and the EPC map.")
@click.option("--html", "html_out", type=click.Path(), metavar="OUT.html",
              help="Write a self-contained HTML page: report, pictures, event table.")
@click.option("--check-every-step", is_flag=True,
              help="Check the EPC invariants of the host and the guest kernels after every step; a violation "
                   "fails the step.")
@click.option("--compare-upstream", is_flag=True,
              help="Run it twice, as written and on an upstream host (no experiments: epc_balloon off), and "
                   "show the steps side by side.")
@_quiet_option
@_verbose_option
@click.pass_context
def run_cmd(ctx: click.Context, file: str, as_json: bool, trace: str | None, plot: str | None,
            html_out: str | None, check_every_step: bool, compare_upstream: bool, quiet: bool, verbose: bool) -> None:
    """Run a scenario FILE (TOML) on the model and report what happened.

    Exit status: 0 when every step and the final invariant check pass, 1 when
    one fails, 2 for bad input (one line naming the file, the step and the problem).

    \b
    Example:
      vepc run examples/seed_story.toml --trace story.json --plot story.png
      vepc run examples/seed_story.toml --json | jq .host.free_bytes
    """
    import json

    from rich.console import Console

    from vepc.observe.outputs import OutputError, write_outputs
    from vepc.observe.progress import step_progress
    from vepc.scenario import Scenario, ScenarioError
    from vepc.scenario.runner import ScenarioRunner

    quiet, verbose = _verbosity(ctx, quiet, verbose)
    try:
        scenario = Scenario.load(file)
    except ScenarioError as e:
        fail(str(e))
    err = Console(stderr=True)
    with step_progress(len(scenario.steps), enabled=not (quiet or as_json), console=err) as advance:
        runner = ScenarioRunner(scenario, check_every_step=check_every_step,
                                on_step=lambda step, pos, total: advance(f"{step.index}. {step.describe()}"))
        try:
            result = runner.run()
        except ScenarioError as e:
            fail(str(e))
    try:
        write_outputs(result, trace=trace, plot=plot, html=html_out, verbose=verbose)
    except OutputError as e:
        fail(str(e))
    doc = result.to_dict()
    if compare_upstream:
        from dataclasses import replace

        from vepc.observe.report import comparison_table

        upstream = replace(scenario, host=replace(scenario.host, epc_balloon=False))
        try:
            up_doc = ScenarioRunner(upstream, check_every_step=check_every_step).run().to_dict()
        except ScenarioError as e:
            fail(str(e))
        if as_json:
            click.echo(json.dumps({"as_written": doc, "upstream": up_doc}, indent=2))
        elif not quiet:
            Console().print(comparison_table(doc, up_doc))
        sys.exit(result.exit_status)
    if as_json:
        click.echo(json.dumps(doc, indent=2))
    elif not quiet:
        from vepc.observe.report import render_report

        render_report(doc, Console(), verbose=verbose)
        if verbose:
            for s in result.steps:
                if s.traceback:
                    err.print(f"[bold red]step {s.index}: internal error[/]\n{s.traceback}")
    sys.exit(result.exit_status)


@cli.command()
@click.option("-o", "--out", type=click.Path(), default="vepc-demo", show_default=True,
              help="Folder for the report, JSON, trace, picture and HTML page.")
@click.option("--vectors", type=click.Path(), default=None,
              help="Folder with test_enclave.sgxs/.sig (default: ../shared/vectors beside the checkout).")
@_quiet_option
@_verbose_option
@click.pass_context
def demo(ctx: click.Context, out: str, vectors: str | None, quiet: bool, verbose: bool) -> None:
    """Show the virtual EPC's whole story on the model, and write it into a folder.

    A two-node host with host enclaves and two VMs, enclaves built in the guests,
    EPC pressure (host pages reclaimed, VM pages stay), a guest reboot
    (REMOVE_ALL), a VM killed with its SECS in one EPC section and the children in
    another (a zombie, then freed).

    \b
    Example:
      vepc demo --out /tmp/vepc-demo
    """
    from vepc.demo import run_demo
    from vepc.observe.outputs import OutputError
    from vepc.scenario import ScenarioError

    quiet, verbose = _verbosity(ctx, quiet, verbose)
    try:
        status = run_demo(out, vectors=vectors, quiet=quiet, verbose=verbose)
    except (OutputError, ScenarioError) as e:
        fail(str(e))
    except OSError as e:
        fail(f"{getattr(e, 'filename', None) or out}: {e.strerror or e}")
    sys.exit(status)


def _register_extensions() -> None:
    from vepc import cli_fleet, cli_formats, cli_kernel, cli_vmm

    from vepc import cli_realkvm
    from vepc.bench import cli as cli_bench

    cli_formats.register(cli)
    cli_kernel.register(cli)
    cli_vmm.register(cli)
    cli_realkvm.register(cli)
    cli_bench.register(cli)
    cli_fleet.register(cli)


def main() -> None:
    _register_extensions()
    cli()
