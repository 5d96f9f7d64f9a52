"""`regionkd-export`: one command from a checkpoint to a model bundle the SDK runs anywhere.

The command only turns options into `ExportOptions` and draws what `export_bundle` reports
(its steps as a progress bar, its log messages, the summary table); the work is the pipeline's."""
from __future__ import annotations

import logging
from pathlib import Path

import click

from regionkd.sdk.console import echo, progress_bar, run_cli, version_option

from .pipeline import ENGINE_MODES, ExportOptions, default_precisions, export_bundle, parse_precisions


def _mb(n: int) -> str:
    return f"{n / 1e6:.2f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB"


def summary_table(manifest: dict, seconds: float) -> str:
    """Files, sizes, parity, CPU latency and Dice per file, and the time taken."""
    metrics = manifest.get("metrics", {})
    classes = manifest["model"]["class_names"][1:]
    by_file = {}
    for m in metrics.values():
        for sub in [m] + list((m.get("flavours") or {}).values()) + \
                ([m["cpu_flavour_not_shipped"]] if "cpu_flavour_not_shipped" in m else []):
            by_file[sub["file"]] = sub
    head = ["file", "precision", "backends", "size", "max|dlogit|", "argmax agree", "CPU ms/slice"] + \
        [f"Dice {c}" for c in classes]
    rows = []
    for e in manifest["files"]:
        m = by_file.get(e["path"], {})
        par = m.get("parity") or {}
        lat = (m.get("cpu_latency_ms") or {}).get("median_ms")
        dice = m.get("dice") or {}
        rows.append([e["path"], e["precision"], ",".join(e["backends"]), _mb(e["bytes"]),
                     f"{par['max_abs_logit_diff']:.2e}" if par else "-",
                     f"{par['argmax_agreement']:.5f}" if par else "-",
                     f"{lat:.2f}" if lat is not None else "-"] +
                    [f"{dice[c]:.4f}" if dice.get(c) is not None else "-" for c in classes])
    widths = [max(len(str(r[i])) for r in [head] + rows) for i in range(len(head))]
    line = lambda r: "  ".join(str(v).ljust(w) for v, w in zip(r, widths))  # noqa: E731
    return "\n".join([line(head), line(["-" * w for w in widths])] + [line(r) for r in rows] +
                     [f"bundle written in {seconds:.1f} s"])


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("checkpoint", type=click.Path(dir_okay=False, path_type=Path))
@click.option("-o", "--out", "--output", "out", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Bundle directory to write (written to a temporary directory, renamed into place at the end).")
@click.option("--precision", "--precisions", "precision", default=None,
              help="Comma-separated precisions among fp32, fp16, int8 (fp32 is always included: it is the reference). "
                   "Default: fp32,fp16, and int8 too when --calib is given.")
@click.option("--calib", type=click.Path(file_okay=False, path_type=Path),
              help="Dataset directory with CT volumes and labels for INT8 calibration (required for int8).")
@click.option("--calib-slices", default=200, show_default=True, type=click.IntRange(1),
              help="Number of calibration slices, stratified so that lesion slices are included.")
@click.option("--val", type=click.Path(file_okay=False, path_type=Path),
              help="Dataset directory of validation volumes: per-class Dice of every precision, and the --max-dice-drop gate.")
@click.option("--engine", type=click.Choice(ENGINE_MODES), default="auto", show_default=True,
              help="auto: build every TensorRT / TensorRT-RTX engine possible here and say what was skipped; "
                   "require: fail if none could be built; never: ONNX only.")
@click.option("--max-batch", default=16, show_default=True, type=click.IntRange(1),
              help="Largest batch of slices the engines' optimisation profile accepts (1..B).")
@click.option("--max-dice-drop", default=0.01, show_default=True, type=click.FloatRange(0.0),
              help="Largest allowed per-class Dice loss (absolute) of fp16/int8 against fp32; more refuses the export.")
@click.option("--name", default=None, help="Model name in the manifest (default: <task>-<arch>).")
@click.option("--overwrite", is_flag=True, help="Replace an existing bundle directory (only once the new one is complete).")
@click.option("--sign-key", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Sign the manifest with this Ed25519 private key (from `regionkd-sign keygen`); scanners that "
                   "trust its public key (regionkd-segment --trusted-key) run only bundles it signed.")
@click.option("--model-version", default=None, help="The model's version (manifest metadata.version; the DICOM "
                                                  "SEG's algorithm version), e.g. 1.2.0.")
@click.option("--description", default=None, help="What the model does (metadata.description).")
@click.option("--authors", default=None, help="Who made it (metadata.authors).")
@click.option("--copyright", "copyright_", default=None, help="Copyright notice (metadata.copyright).")
@click.option("--license", "license_", default=None, help="Licence of the model, e.g. an SPDX id (metadata.license).")
@click.option("--intended-use", default=None,
              help="What the model is for and not for (metadata.intended_use), e.g. 'research use only'.")
@click.option("--reference", "references", multiple=True,
              help="A publication or web page about the model (metadata.references; repeatable).")
@click.option("--no-fused", is_flag=True,
              help="Do not ship the fused models (raw HU slices in, uint8 labels out: window, resizes and argmax "
                   "inside the graph), which the runtime otherwise prefers; each is checked against the numpy path "
                   "first (label agreement >= 99.99 % per volume).")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar, messages or summary; errors only.")
@version_option
def export_command(checkpoint, out, precision, calib, calib_slices, val, engine, max_batch, max_dice_drop,
                   name, overwrite, sign_key, model_version, description, authors, copyright_, license_, intended_use,
                   references, no_fused, quiet):
    """Export the network in CHECKPOINT to a model bundle: fp32/fp16/int8 ONNX, TensorRT engines, manifest.json.

    With no data given, parity with PyTorch is measured on slices of a synthetic CT; give --val
    (Dice per precision and the --max-dice-drop gate) and --calib (INT8) for a bundle to ship."""
    precisions = parse_precisions(precision) if precision is not None else default_precisions(calib)
    metadata = {"version": model_version, "description": description, "authors": authors, "copyright": copyright_,
                "license": license_, "intended_use": intended_use, "references": list(references)}
    opts = ExportOptions(checkpoint=checkpoint, out=out, precisions=precisions, calib=calib,
                         calib_slices=calib_slices, val=val, engine=engine, max_batch=max_batch,
                         max_dice_drop=max_dice_drop, overwrite=overwrite, name=name, sign_key=sign_key,
                         fused=not no_fused,
                         metadata={k: v for k, v in metadata.items() if v not in (None, "", [])})
    with StepProgress(quiet) as progress:
        result = export_bundle(opts, progress=progress)
    if not quiet:
        click.echo(summary_table(result.manifest, result.seconds))
        click.echo(f"bundle: {result.bundle}" + (f" (signed, key {result.signed_by})" if result.signed_by else
                                                  " (unsigned)"))
    return 0


class StepProgress:
    """What the command shows of an export: its steps as a progress bar (`progress_bar`: a bar on a
    terminal, plain lines otherwise) and the export's log messages as lines that do not break it.
    The bar is made at the first step, once every option has been checked, so a refused command
    draws none; `quiet` shows neither."""

    def __init__(self, quiet: bool = False):
        self.quiet, self.bar = quiet, None
        self._logger = logging.getLogger("regionkd.export")
        self._handler = _EchoHandler(self)
        self._level = self._logger.level

    def __call__(self, step: str, done: int, total: int) -> None:
        if self.bar is None:
            self.bar = progress_bar(total=total, desc="export", unit="step", quiet=self.quiet)
        self.bar.set_postfix_str(step)
        self.bar.update(done - self.bar.n)

    def __enter__(self):
        if not self.quiet:
            self._logger.addHandler(self._handler)
            self._logger.setLevel(logging.INFO)
        return self

    def __exit__(self, *exc):
        self._logger.removeHandler(self._handler)
        self._logger.setLevel(self._level)
        if self.bar is not None:
            self.bar.close()


class _EchoHandler(logging.Handler):
    """Log records as plain lines, through the progress bar while there is one."""

    def __init__(self, progress: StepProgress):
        super().__init__(logging.INFO)
        self.progress = progress

    def emit(self, record: logging.LogRecord) -> None:
        echo(record.getMessage(), self.progress.bar)


def main(argv=None) -> None:
    run_cli(export_command, argv)


if __name__ == "__main__":
    main()
