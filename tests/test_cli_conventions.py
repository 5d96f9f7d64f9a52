"""What every regionkd CLI shares: --version, the same spelling of the output option
(-o / --out / --output) and of the precision option (--precision / --precisions), help on every option."""
from __future__ import annotations

import importlib

import click
import pytest
from tests.helpers import run_main

from regionkd.sdk import __version__

COMMANDS = {"regionkd-segment": "regionkd.sdk.cli_segment", "regionkd-bench": "regionkd.sdk.cli_bench",
            "regionkd-sign": "regionkd.sdk.cli_sign", "regionkd-export": "regionkd.export.cli",
            "regionkd-train": "regionkd.train.cli"}


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_cli_has_version(name, capsys):
    if name in ("regionkd-export", "regionkd-train"):
        pytest.importorskip("torch", reason="the train/export extras are not installed")
    main = importlib.import_module(COMMANDS[name]).main
    code, out, _ = run_main(main, ["--version"], capsys)
    assert code == 0 and out.strip().endswith(f"regionkd {__version__}")


def _options(command: click.Command) -> dict:
    return {p.name: p for p in command.params if isinstance(p, click.Option)}


def test_output_and_precision_options_are_spelled_alike():
    pytest.importorskip("torch", reason="the train/export extras are not installed")
    from regionkd.export.cli import export_command
    from regionkd.sdk.cli_bench import bench
    from regionkd.sdk.cli_segment import segment
    from regionkd.train.cli_training import student

    assert {"-o", "--out", "--output"} <= set(_options(segment)["output"].opts)
    assert {"-o", "--out", "--output"} <= set(_options(export_command)["out"].opts)
    assert {"-o", "--out"} <= set(_options(student)["out"].opts)
    assert {"--precision", "--precisions"} <= set(_options(segment)["precision"].opts)
    assert {"--precision", "--precisions"} <= set(_options(export_command)["precision"].opts)
    assert {"--precision", "--precisions"} <= set(_options(bench)["precisions"].opts)
    assert _options(bench)["backends"].default == _options(segment)["backend"].default == "auto"
    for command in (segment, bench, export_command, student):
        undocumented = [p.name for p in _options(command).values() if not p.help and p.name not in ("version",)]
        assert undocumented == [], f"{command.name}: options without help: {undocumented}"
