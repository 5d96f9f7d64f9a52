"""`regionkd-train phantoms`: write a synthetic CT dataset in a public dataset's layout."""
from __future__ import annotations

from pathlib import Path

import click

from regionkd.sdk.console import progress_bar

from .data.layouts import LAYOUTS
from .data.phantoms import DEFAULT_SHAPE, write_phantoms
from .data.tasks import TASKS


def _parse_shape(ctx, param, value):
    try:
        shape = tuple(int(v) for v in value.split(","))
    except ValueError:
        raise click.BadParameter(f"expected X,Y,Z integers, got {value!r}") from None
    if len(shape) != 3 or min(shape) < 8:
        raise click.BadParameter(f"expected three sizes of at least 8 voxels, got {value!r}")
    return shape


@click.command("phantoms")
@click.argument("out", type=click.Path(file_okay=False, path_type=Path))
@click.option("--task", type=click.Choice(sorted(TASKS)), default="liver", show_default=True,
              help="liver (labels 0/1 liver/2 tumour, as LiTS) or kidney (0/1 kidney/2 tumour, as KiTS19).")
@click.option("--layout", type=click.Choice(LAYOUTS), default=None,
              help="Files and voxel order of LiTS, KiTS19 (slice axis first) or MSD/nnU-Net raw. Default: lits for "
                   "liver, kits19 for kidney. Readers take the task from the layout (LiTS liver, KiTS19 kidney) "
                   "unless told otherwise; MSD records it in dataset.json.")
@click.option("--cases", type=click.IntRange(1), default=4, show_default=True, help="Number of cases.")
@click.option("--seed", type=int, default=0, show_default=True, help="Same seed, same voxels.")
@click.option("--shape", default=",".join(map(str, DEFAULT_SHAPE)), show_default=True, callback=_parse_shape,
              help="X,Y in-plane voxels and Z slices (whatever order the layout stores). The field of view is "
                   "that of a 512 matrix at 0.6-0.9 mm, so 256 gives 1.2-1.8 mm pixels; slices are 1-5 mm, "
                   "thicker when Z is too small to cover 120 mm.")
@click.option("--min-lesion-mm", type=click.FloatRange(0, 80), default=0.0, show_default=True,
              help="Smallest tumour diameter in mm (default: liver 3-40 mm, kidney 12-80 mm). Raise it for coarse "
                   "CPU runs, where lesions of a pixel or two cannot be learned.")
@click.option("--lesion-contrast", type=click.FloatRange(0.1, 10), default=1.0, show_default=True,
              help="Multiply each liver lesion's HU difference to the liver (10-40 HU as drawn). Same lesions, only "
                   "more or less conspicuous; kidney masses ignore it.")
@click.option("--images-only", is_flag=True,
              help="Write only the CT images, as a plain folder of NIfTI files (ct-NNNN.nii.gz, the layout's voxel "
                   "order), without labels: a stand-in for unannotated scans (regionkd-train distill --unlabelled).")
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar or summary.")
def phantoms(out, task, layout, cases, seed, shape, min_lesion_mm, lesion_contrast, images_only, overwrite, quiet):
    """Write OUT: synthetic abdominal CT phantoms with labels, in a public dataset's layout.

    Anatomy in HU (fat, muscle, liver, spleen, kidneys, stomach, bowel, heart, lungs, spine),
    a contrast phase per case, confounders (cysts and vessels labelled as organ, neighbours at
    organ density) and varied tumours. The dataset is built in a temporary folder and moved into
    place when complete.
    """
    layout = layout or ("kits19" if task == "kidney" else "lits")
    if out.exists() and not overwrite:
        raise click.UsageError(f"{out} already exists; pass --overwrite to replace it")
    with progress_bar(total=cases, desc=f"phantoms ({task}, {layout})", unit="case", quiet=quiet) as bar:
        written = write_phantoms(out, task, layout, cases, seed, shape, min_lesion_mm=min_lesion_mm,
                                 lesion_contrast=lesion_contrast, images_only=images_only, progress=bar.update)
    if not quiet:
        what = "image(s) without labels" if images_only else f"case(s), {layout} layout"
        click.echo(f"wrote {cases} {task} phantom {what} ({written['tumours']} tumour(s)) to {out}")
    return 0
