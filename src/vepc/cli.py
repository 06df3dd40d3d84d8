"""The ``vepc`` command line.

Every command turns bad input into one line on stderr (``vepc: WHERE: problem``) and exit status 2.

Example::

    vepc demo
    vepc sgxs measure enclave.sgxs
"""

from __future__ import annotations

import sys

import click

from vepc import __version__

__all__ = ["main", "cli", "fail"]


def fail(message: str) -> "NoReturn":  # type: ignore[name-defined]
    """Print one clear line and exit with status 2 (bad input)."""
    click.echo(f"vepc: {message}", err=True)
    sys.exit(2)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="vepc")
def cli() -> None:
    """vepc: the Linux SGX virtual EPC and the SGX virtualization stack, as an executable model.

    \b
    Examples:
      vepc demo
      vepc sgxs measure enclave.sgxs
      vepc sigstruct show enclave.sig --json
    """


@cli.command()
@click.option("--vectors", type=click.Path(file_okay=False), default=None,
              help="Folder with test_enclave.sgxs/.sig (default: ../shared/vectors beside the checkout).")
def demo(vectors: str | None) -> None:
    """Run the built-in demonstration on the model and print what happened.

    \b
    Example:
      vepc demo
    """
    from vepc.demo import run_demo

    try:
        run_demo(vectors)
    except (OSError, ValueError) as e:
        fail(str(e))


def _register_extensions() -> None:
    from vepc import cli_formats, cli_kernel, cli_vmm

    cli_formats.register(cli)
    cli_kernel.register(cli)
    cli_vmm.register(cli)


def main() -> None:
    _register_extensions()
    cli()
