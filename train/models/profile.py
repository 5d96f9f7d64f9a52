"""Model size and cost: parameters, and FLOPs per slice counted by
torch.utils.flop_counter.FlopCounterMode. It counts the matrix multiplies and convolutions
(incl. transposed) with FLOPs = 2 x multiply-accumulates; batch norm, activations, pooling,
resizing and element-wise adds are not counted (they are a few percent at most)."""
from __future__ import annotations

import torch
from torch import nn


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def flops_per_slice(model: nn.Module, size=(384, 384), in_channels: int = 1) -> int:
    """FLOPs (2 x MACs) of one forward pass on a single 1 x in_channels x H x W slice, eval mode."""
    from torch.utils.flop_counter import FlopCounterMode

    was_training = model.training
    model.eval()
    try:
        x = torch.zeros(1, in_channels, *size)
        with FlopCounterMode(display=False) as counter:
            model(x)
        return int(counter.get_total_flops())
    finally:
        model.train(was_training)


def model_table(names=None, size=(384, 384), num_classes: int = 3) -> list[dict]:
    """Rows {"name", "params", "gflops"} for printing, one per registered network (or `names`)."""
    from .registry import create_model, list_models

    rows = []
    for name in names or list_models():
        model = create_model(name, num_classes=num_classes)
        rows.append({"name": name, "params": count_params(model),
                     "gflops": flops_per_slice(model, size) / 1e9})
    return rows


def format_table(rows: list[dict], size=(384, 384)) -> str:
    """Markdown table of model_table rows."""
    lines = [f"| network | params | GFLOPs per {size[0]}x{size[1]} slice |", "| --- | ---: | ---: |"]
    lines += [f"| {r['name']} | {r['params'] / 1e6:.3f} M | {r['gflops']:.3f} |" for r in rows]
    return "\n".join(lines)


def _command():
    import click

    @click.command("models")
    @click.argument("names", nargs=-1)
    @click.option("--size", nargs=2, type=int, default=(384, 384), show_default=True, help="input H W")
    @click.option("--num-classes", type=int, default=3, show_default=True)
    def models(names, size, num_classes):
        """Print params and FLOPs per slice (2 x MACs of convs/matmuls, FlopCounterMode) of the
        registered networks, or of NAMES."""
        try:
            rows = model_table(list(names) or None, tuple(size), num_classes)
        except ValueError as exc:
            raise click.UsageError(str(exc)) from exc
        click.echo(format_table(rows, tuple(size)))

    return models


models_command = _command()

if __name__ == "__main__":
    from regionkd.sdk.console import run_cli

    run_cli(models_command)
