"""`--preview PNG`: a sheet of axial slices a radiologist can read at a glance.

- Slices from the canonical (RAS) volume, sliced as the segmentation was, shown in radiological
  convention (patient's right on the image's left, anterior up), with the orientation letters
  (R, L, A, P) on the first tile, in a soft-tissue display window (-160..240 HU).
- Cropped to the body (voxels above -500 HU in any slice, with a margin) and scaled to the
  physical aspect of the pixels, `tile_px` pixels on the longer side (256: a 12-slice sheet is
  about 1024 x 830 pixels).
- One colour per class (a translucent fill with its outline); lesion classes are outlined
  boldly. A legend strip names the classes and the window.
- Each tile is labelled with its slice index in the input's own voxel order along the axial
  axis and the slice's z position (the S coordinate of its centre, mm).
- Slices: where the organ (any label) is; every slice with a lesion when there are at most
  `n_slices` of them (the rest spread over the organ), else spread over the lesion slices with the
  largest lesion's slice always shown. No label at all: spread over the whole volume.
- `reference` (a ground-truth mask of the same volume): each tile gets the reference drawn the same
  way beside it, "prediction | reference", on the same slices.
"""
from __future__ import annotations

import math
import os

import numpy as np

from .atomic import atomic_path
from .errors import require
from .orientation import slice_geometry, to_canonical

# RGB per label 1, 2, 3, ...; background is left transparent
COLOURS = np.array([[0, 200, 0], [230, 30, 30], [40, 120, 255], [255, 200, 0], [200, 0, 200]], dtype=np.float32)
DISPLAY_WINDOW = (-160.0, 240.0)      # soft tissue: level 40, width 400
BODY_HU = -500.0
LESION_WORDS = ("tumour", "tumor", "lesion", "cyst", "metastasis", "neoplasm")
FILL_ALPHA = 0.35
LEGEND_H = 28
GAP = 2


def _display(slice_xy: np.ndarray) -> np.ndarray:
    """(x, y) canonical slice -> (rows, cols) image: anterior up, patient's right on the left."""
    return slice_xy.T[::-1, ::-1]


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError, ImportError):   # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def body_box(image: np.ndarray, margin: float = 0.04) -> tuple[slice, slice]:
    """(x, y) bounding box of the body (HU > BODY_HU in any slice) with a margin; the full slice if none."""
    body = (image > BODY_HU).any(axis=2)
    nx, ny = body.shape
    xs, ys = np.flatnonzero(body.any(axis=1)), np.flatnonzero(body.any(axis=0))
    if xs.size == 0:
        return slice(0, nx), slice(0, ny)
    mx, my = max(1, int(margin * nx)), max(1, int(margin * ny))
    return slice(max(0, xs[0] - mx), min(nx, xs[-1] + 1 + mx)), slice(max(0, ys[0] - my), min(ny, ys[-1] + 1 + my))


def choose_slices(labels: np.ndarray, lesion_labels, n_slices: int) -> np.ndarray:
    """Canonical slice indices to show (see the module doc)."""
    z = labels.shape[2]
    any_label = labels.reshape(-1, z).any(axis=0) if labels.size else np.zeros(z, bool)
    organ = np.flatnonzero(any_label)
    if organ.size == 0:
        return np.unique(np.linspace(0, z - 1, min(n_slices, z)).round().astype(int))
    lesion_area = np.zeros(z, dtype=np.int64)
    for label in lesion_labels:
        lesion_area += (labels == label).reshape(-1, z).sum(axis=0)
    lesion = np.flatnonzero(lesion_area)
    if lesion.size > n_slices:
        picks = lesion[np.linspace(0, lesion.size - 1, n_slices).round().astype(int)]
        biggest = int(np.argmax(lesion_area))
        if biggest not in picks:
            picks[np.argmin(np.abs(picks - biggest))] = biggest
        return np.unique(picks)
    rest = np.setdiff1d(organ, lesion)
    n_rest = min(n_slices - lesion.size, rest.size)
    fill = rest[np.linspace(0, rest.size - 1, n_rest).round().astype(int)] if n_rest > 0 else np.array([], int)
    return np.unique(np.concatenate([lesion, fill]).astype(int))


def _outline(lab: np.ndarray, label: int, width: int) -> np.ndarray:
    from scipy import ndimage

    sel = lab == label
    if not sel.any():
        return sel
    inner = ndimage.binary_erosion(sel, iterations=width, border_value=0)
    return sel & ~inner


def _render(grey: np.ndarray, lab: np.ndarray, lesion_labels, n_classes: int) -> np.ndarray:
    """(h, w) grey 0..255 and (h, w) labels at display size -> (h, w, 3) float RGB."""
    rgb = np.repeat(grey[..., None], 3, axis=-1).astype(np.float32)
    for label in range(1, n_classes):
        sel = lab == label
        if not sel.any():
            continue
        colour = COLOURS[(label - 1) % len(COLOURS)]
        rgb[sel] = (1 - FILL_ALPHA) * rgb[sel] + FILL_ALPHA * colour
        edge = _outline(lab, label, 2 if label in lesion_labels else 1)
        rgb[edge] = np.array([255, 255, 0], np.float32) if label in lesion_labels else colour
    return rgb


def _resize(array: np.ndarray, size: tuple[int, int], nearest: bool) -> np.ndarray:
    from PIL import Image

    w, h = size
    if nearest:
        return np.asarray(Image.fromarray(array.astype(np.uint8)).resize((w, h), Image.NEAREST))
    return np.asarray(Image.fromarray(array.astype(np.float32), mode="F").resize((w, h), Image.BILINEAR))


def montage(hu: np.ndarray, mask: np.ndarray, affine, window=None, n_slices: int = 12, alpha: float | None = None,
            axial_axis: int | None = None, class_names=None, reference: np.ndarray | None = None,
            tile_px: int = 256, display_window=DISPLAY_WINDOW) -> np.ndarray:
    """(H, W, 3) uint8 preview sheet of `mask` (and `reference`) over `hu` (see the module doc).
    `window` (the model's HU window) is named in the legend; the image is shown in `display_window`."""
    from PIL import Image, ImageDraw

    ornt = slice_geometry(affine, axial_axis).ornt
    canon = to_canonical(np.asarray(hu, dtype=np.float32), affine, ornt=ornt)
    labels = to_canonical(np.asarray(mask), affine, ornt=ornt).data
    ref = to_canonical(np.asarray(reference), affine, ornt=ornt).data if reference is not None else None
    class_names, n_classes, lesion_labels = _classes(labels, ref, class_names)
    picks = choose_slices(labels if ref is None else np.maximum(labels, ref), lesion_labels, n_slices)
    box = body_box(canon.data)
    size = _tile_size(box, canon.spacing, tile_px)
    layers = [labels] if ref is None else [labels, ref]
    tiles = [_tile(canon, layers, box, k, size, display_window, lesion_labels, n_classes, ornt) for k in picks]

    sheet, positions = _arrange(tiles, len(layers))
    pil = Image.fromarray(np.clip(sheet, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(pil)
    small, big = _font(12), _font(14)
    _label_tiles(draw, tiles, positions, size, len(layers), small)
    _orientation_letters(draw, positions[0], size, big)
    _legend(draw, class_names, lesion_labels, window, display_window, sheet.shape[1], small, big)
    return np.asarray(pil)


def _classes(labels: np.ndarray, ref: np.ndarray | None, class_names):
    """(class names, number of classes, lesion labels): names default to "label N" for every label present."""
    n_classes = int(max(labels.max(initial=0), ref.max(initial=0) if ref is not None else 0)) + 1
    if class_names is None:
        class_names = ["background"] + [f"label {i}" for i in range(1, n_classes)]
    n_classes = max(n_classes, len(class_names))
    lesion_labels = {i for i, n in enumerate(class_names) if i > 0 and any(w in n.lower() for w in LESION_WORDS)}
    return class_names, n_classes, lesion_labels


def _tile_size(box: tuple[slice, slice], spacing, tile_px: int) -> tuple[int, int]:
    """(width, height) of one panel: the body box at its physical aspect, `tile_px` on the longer side."""
    bx, by = box
    sx, sy = (float(v) for v in spacing[:2])
    width_mm, height_mm = (bx.stop - bx.start) * sx, (by.stop - by.start) * sy
    scale = tile_px / max(width_mm, height_mm)
    return max(8, round(width_mm * scale)), max(8, round(height_mm * scale))


def _input_slice_index(ornt, n_slices: int, k: int) -> int:
    """The input's own index along its axial axis of canonical slice k."""
    axial_in = int(np.flatnonzero(np.asarray(ornt)[:, 0] == 2)[0])
    flipped = np.asarray(ornt)[axial_in, 1] < 0
    return int(n_slices - 1 - k if flipped else k)


def _tile(canon, layers, box, k, size, display_window, lesion_labels, n_classes, ornt):
    """(pixels, input slice index, z mm) of canonical slice k: one panel per label volume in `layers`,
    side by side."""
    bx, by = box
    lo, hi = display_window
    grey = np.clip((canon.data[bx, by, k] - lo) / (hi - lo), 0, 1) * 255.0
    grey = _resize(_display(grey), size, nearest=False)
    panels = [_render(grey, _resize(_display(lab_vol[bx, by, k]), size, nearest=True), lesion_labels, n_classes)
              for lab_vol in layers]
    pixels = np.concatenate([np.pad(p, ((0, 0), (0, GAP), (0, 0))) for p in panels], axis=1)[:, :-GAP] \
        if len(panels) > 1 else panels[0]
    centre = [(bx.start + bx.stop - 1) / 2, (by.start + by.stop - 1) / 2]
    z_mm = float((canon.affine @ [*centre, float(k), 1.0])[2])
    return pixels, _input_slice_index(ornt, canon.data.shape[2], k), z_mm


def _arrange(tiles, panels: int):
    """The tiles in rows below the legend strip: (sheet float RGB, (x0, y0) of each tile)."""
    cols = max(1, min(4 // panels, len(tiles)))
    rows = math.ceil(len(tiles) / cols)
    tile_w, tile_h = tiles[0][0].shape[1], tiles[0][0].shape[0]
    sheet_w, sheet_h = cols * tile_w + (cols - 1) * GAP * 2, rows * tile_h + (rows - 1) * GAP * 2 + LEGEND_H
    sheet = np.zeros((sheet_h, sheet_w, 3), dtype=np.float32)
    positions = []
    for i, (tile, _, _) in enumerate(tiles):
        r, c = divmod(i, cols)
        y0, x0 = LEGEND_H + r * (tile_h + 2 * GAP), c * (tile_w + 2 * GAP)
        sheet[y0:y0 + tile_h, x0:x0 + tile_w] = tile
        positions.append((x0, y0))
    return sheet, positions


def _label_tiles(draw, tiles, positions, size, panels: int, font) -> None:
    """Each tile's slice index and z; "prediction" and "reference" under its panels when there are two."""
    tw, th = size
    for (_, index, z_mm), (x0, y0) in zip(tiles, positions):
        _text(draw, (x0 + 4, y0 + 3), f"slice {index}  z {z_mm:.1f} mm", font)
        if panels > 1:
            _text(draw, (x0 + 4, y0 + th - 16), "prediction", font)
            _text(draw, (x0 + tw + GAP + 4, y0 + th - 16), "reference", font)


def _orientation_letters(draw, position, size, font) -> None:
    """A, P, R, L at the edges of the first tile's (prediction) panel."""
    (x0, y0), (tw, th) = position, size
    for letter, (x, y) in {"A": (x0 + tw // 2 - 4, y0 + 18), "P": (x0 + tw // 2 - 4, y0 + th - 18),
                           "R": (x0 + 4, y0 + th // 2 - 7), "L": (x0 + tw - 12, y0 + th // 2 - 7)}.items():
        _text(draw, (x, y), letter, font, fill=(255, 255, 0))


def _legend(draw, class_names, lesion_labels, window, display_window, sheet_w: int, small, big) -> None:
    """The legend strip: a swatch and name per class, then the windows, right-aligned when there is room."""
    x = 6
    for label in range(1, len(class_names)):
        colour = tuple(int(v) for v in COLOURS[(label - 1) % len(COLOURS)])
        draw.rectangle([x, 8, x + 12, 20], fill=colour, outline=(255, 255, 0) if label in lesion_labels else colour,
                       width=2 if label in lesion_labels else 1)
        name = class_names[label] + (" (outlined)" if label in lesion_labels else "")
        draw.text((x + 17, 6), name, font=big, fill=(255, 255, 255))
        x += 17 + int(draw.textlength(name, font=big)) + 14
    lo, hi = display_window
    note = f"display {lo:.0f}..{hi:.0f} HU" + (f"; model window {window[0]:.0f}..{window[1]:.0f} HU" if window else "")
    note += "; left: patient's right"
    draw.text((max(x, sheet_w - int(draw.textlength(note, font=small)) - 6), 9), note, font=small,
              fill=(200, 200, 200))


def _text(draw, xy, text, font, fill=(255, 255, 255)):
    """Text with a dark shadow, readable over any grey."""
    x, y = xy
    draw.text((x + 1, y + 1), text, font=font, fill=(0, 0, 0))
    draw.text((x, y), text, font=font, fill=fill)


def write_preview(path: str | os.PathLike, hu: np.ndarray, mask: np.ndarray, affine, window=None, n_slices: int = 12,
                  axial_axis: int | None = None, class_names=None, reference: np.ndarray | None = None,
                  tile_px: int = 256) -> None:
    """Write the preview sheet as PNG atomically."""
    pil = require("PIL.Image", purpose="--preview")
    sheet = montage(hu, mask, affine, window, n_slices, axial_axis=axial_axis, class_names=class_names,
                    reference=reference, tile_px=tile_px)
    with atomic_path(path, suffix="") as tmp:
        pil.fromarray(sheet).save(tmp, format="PNG", optimize=True)
