"""What every regionkd CLI shares: expected errors become one clear line on stderr and exit 1."""
from __future__ import annotations

import sys

import click

from .errors import RegionKDError


def version_option(fn):
    """`--version` on every regionkd command: 'regionkd-segment, regionkd 0.1.0'."""
    from . import __version__

    return click.version_option(__version__, "--version", message="%(prog)s, regionkd %(version)s")(fn)


def run_cli(command: click.Command, argv=None) -> None:
    try:
        rc = command.main(args=argv, standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("Aborted.", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except (RegionKDError, FileNotFoundError, FileExistsError) as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(1)
    except KeyboardInterrupt:
        click.echo("Interrupted.", err=True)
        sys.exit(130)
    # a command returns a non-zero int when some of its work failed (e.g. one input of many)
    if isinstance(rc, int) and rc:
        sys.exit(rc)
