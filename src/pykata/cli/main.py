"""Entry point of the `pykata` command: a thin click group over library code."""

from __future__ import annotations

import logging
import sys

import click

from pykata import __version__
from pykata.cli.agent_ctl import agent_ctl
from pykata.cli.check import check
from pykata.cli.collect import collect
from pykata.cli.config_cmd import env
from pykata.cli.cp import cp
from pykata.cli.factory import factory
from pykata.cli.image import image
from pykata.cli.install import install
from pykata.cli.monitor_cmd import monitor
from pykata.cli.run import COMMANDS as RUN_COMMANDS
from pykata.cli.sandbox_cmd import sandbox
from pykata.errors import PykataError


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="pykata")
@click.option("--debug", is_flag=True, envvar="PYKATA_DEBUG", help="Log what pykata does to stderr.")
def cli(debug: bool) -> None:
    """Run containers inside lightweight virtual machines."""
    logging.basicConfig(level=logging.DEBUG if debug else logging.WARNING, stream=sys.stderr,
                        format="pykata: %(message)s" if not debug else "pykata: %(name)s: %(message)s")
    if not debug:
        # qemu.qmp logs its connect retries as errors; pykata reports a QMP failure itself
        logging.getLogger("qemu.qmp").setLevel(logging.CRITICAL)


cli.add_command(image)
cli.add_command(check)
cli.add_command(env)
cli.add_command(install)
cli.add_command(factory)
cli.add_command(sandbox)
cli.add_command(monitor)
cli.add_command(agent_ctl)
cli.add_command(collect)
cli.add_command(cp)
for _command in RUN_COMMANDS:
    cli.add_command(_command)


def main() -> None:
    try:
        cli()
    except PykataError as e:  # what a command did not report itself (a bad configuration file, ...)
        click.echo(f"pykata: {e}", err=True)
        sys.exit(1)
