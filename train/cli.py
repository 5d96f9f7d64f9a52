"""`regionkd-train`: phantoms, teacher, student, distill, evaluate, models."""
from __future__ import annotations

import click

from regionkd.sdk.console import run_cli, version_option


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@version_option
def cli():
    """Make phantom CT data, train a teacher and students (with or without region-aware
    knowledge distillation), and evaluate checkpoints on CT volumes."""


def _register():
    from .cli_phantoms import phantoms
    from .cli_training import distill, evaluate, student, teacher
    from .models.profile import models_command

    for cmd in (phantoms, teacher, student, distill, evaluate):
        cli.add_command(cmd)
    cli.add_command(models_command, name="models")


_register()


def main(argv=None):
    return run_cli(cli, argv)


if __name__ == "__main__":
    main()
