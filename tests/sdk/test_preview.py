"""The preview: cropped to the body, one colour per class with a legend, lesions outlined,
tiles labelled with slice index and z, orientation letters, slices where the organ and the lesions
are, a sensible size, and a reference drawn beside the prediction."""
from __future__ import annotations

import numpy as np
import pytest
from tests.helpers import make_phantom, run_main

from regionkd.sdk.preview import COLOURS, LEGEND_H, body_box, choose_slices, montage

CLASSES = ["background", "liver", "tumour"]


def yellow(img):
    return (img[..., 0] > 200) & (img[..., 1] > 200) & (img[..., 2] < 80)


def phantom_with_labels():
    hu, affine = make_phantom(shape=(80, 72, 30), with_distractor=False)
    hu = np.pad(hu, ((30, 30), (20, 20), (0, 0)), constant_values=-1000.0)   # a wide field of view around the body
    labels = np.where(hu == 80.0, 1, np.where(hu == 20.0, 2, 0)).astype(np.uint8)
    return hu, labels, affine


def test_slices_where_the_organ_is_and_every_lesion_slice_when_few():
    labels = np.zeros((4, 4, 40), np.uint8)
    labels[..., 10:30] = 1
    labels[1, 1, [12, 13, 20]] = 2
    picks = choose_slices(labels, {2}, 8)
    assert {12, 13, 20} <= set(picks) and len(picks) == 8 and all(10 <= k < 30 for k in picks)
    labels[1, 1, 10:30] = 2                                  # lesions on 20 slices: spread over them
    labels[:, :, 17] = 2                                     # the biggest lesion slice is always shown
    picks = choose_slices(labels, {2}, 6)
    assert len(picks) == 6 and 17 in picks
    assert list(choose_slices(np.zeros((4, 4, 10), np.uint8), {2}, 4)) == [0, 3, 6, 9]   # nothing found: spread


def test_sheet_is_cropped_sized_labelled_and_outlines_lesions():
    hu, labels, affine = phantom_with_labels()
    sheet = montage(hu, labels, affine, [-60, 140], class_names=CLASSES)
    h, w, _ = sheet.shape
    assert 600 <= w <= 1100 and h <= 1100                   # 12 tiles of 256 px and a legend strip
    # legend strip: a swatch of each class colour
    legend = sheet[:LEGEND_H]
    for label in (1, 2):
        colour = COLOURS[label - 1].astype(int)
        assert (np.abs(legend.astype(int) - colour).sum(axis=-1) < 10).sum() > 40
    tiles = sheet[LEGEND_H:].astype(int)
    assert yellow(tiles).sum() > 200                         # lesion outlines and the orientation letters
    green = (tiles[..., 1] > tiles[..., 0] + 40) & (tiles[..., 1] > tiles[..., 2] + 40)
    assert green.sum() > 2000
    # cropped to the body: the body ellipse fills most of a tile's width (not a small blob in black)
    x, y = body_box(hu)                                      # the phantom is stored in RAS order
    assert (x.stop - x.start) < hu.shape[0] and (y.stop - y.start) < hu.shape[1]
    tile = tiles[:, : w // 4 - 4]
    dark_cols = (tile.max(axis=(0, 2)) < 30).mean()
    assert dark_cols < 0.1                                   # hardly a column of a tile is all black


def test_text_labels_are_drawn(tmp_path):
    """The slice label and orientation letters are real text: drawing with other class names or
    slices changes exactly the text regions."""
    hu, labels, affine = phantom_with_labels()
    a = montage(hu, labels, affine, class_names=CLASSES, n_slices=1).astype(int)
    b = montage(hu, labels, affine, class_names=["background", "organ", "tumour"], n_slices=1).astype(int)
    diff = np.argwhere(np.abs(a - b).sum(axis=-1) > 0)
    assert diff.size and diff[:, 0].max() < LEGEND_H            # only the legend changed


def test_reference_is_drawn_beside_the_prediction():
    hu, labels, affine = phantom_with_labels()
    from regionkd.sdk.preview import GAP

    alone = montage(hu, labels, affine, class_names=CLASSES, n_slices=1)
    ref = labels.copy()
    ref[ref == 2] = 1                                           # the reference has no tumour
    pair = montage(hu, labels, affine, class_names=CLASSES, n_slices=1, reference=ref)
    tile_w = alone.shape[1]
    assert pair.shape[1] == 2 * tile_w + GAP and pair.shape[0] == alone.shape[0]
    left, right = pair[LEGEND_H:, :tile_w], pair[LEGEND_H:, tile_w + GAP:]
    # the prediction tile is the one drawn alone, but for its "prediction" caption at the bottom
    assert np.array_equal(left[:-20], alone[LEGEND_H:-20]) and not np.array_equal(left[-20:], alone[-20:])
    def red(t):
        t = t.astype(int)
        return ((t[..., 0] > t[..., 1] + 40) & (t[..., 0] > t[..., 2] + 40)).sum()

    assert red(left) > 20 and red(right) == 0                     # tumour fill in the prediction only


def test_cli_preview_with_reference(tiny_bundle, tmp_path, capsys):
    import nibabel as nib
    from PIL import Image

    from regionkd.sdk.cli_segment import main

    hu, labels, affine = phantom_with_labels()
    img = nib.Nifti1Image(hu.astype(np.int16), affine)
    img.header.set_qform(affine, code=1)
    nib.save(img, str(tmp_path / "ct.nii.gz"))
    nib.save(nib.Nifti1Image(labels, affine), str(tmp_path / "truth.nii.gz"))
    code, _, err = run_main(main, [tiny_bundle, tmp_path / "ct.nii.gz", "-o", tmp_path / "m.nii.gz", "--preview",
                                   tmp_path / "p.png", "--reference", tmp_path / "truth.nii.gz", "--backend",
                                   "onnxruntime"], capsys)
    assert code == 0, err
    assert Image.open(tmp_path / "p.png").size[0] > 600
    nib.save(nib.Nifti1Image(labels[:-1], affine), str(tmp_path / "bad.nii.gz"))
    code, _, err = run_main(main, [tiny_bundle, tmp_path / "ct.nii.gz", "-o", tmp_path / "m2.nii.gz", "--preview",
                                   tmp_path / "p2.png", "--reference", tmp_path / "bad.nii.gz", "--backend",
                                   "onnxruntime"], capsys)
    assert code == 1 and "--reference" in err and "bad.nii.gz" in err
    code, _, err = run_main(main, [tiny_bundle, tmp_path / "ct.nii.gz", "-o", tmp_path / "m3.nii.gz", "--reference",
                                   tmp_path / "truth.nii.gz"], capsys)
    assert code == 2 and "give --preview" in err


@pytest.mark.parametrize("axial_axis", [None, 0])
def test_slice_labels_follow_the_inputs_own_index(axial_axis):
    """Stored slice-axis-first and reversed, the tiles still show the input's own slice numbers."""
    from regionkd.sdk import preview

    hu, labels, affine = phantom_with_labels()
    seen = []
    real = preview._text

    def spy(draw, xy, text, font, fill=(255, 255, 255)):
        seen.append(text)
        return real(draw, xy, text, font, fill)

    preview._text = spy
    try:
        montage(hu, labels, affine, class_names=CLASSES, n_slices=3)
        plain = [t for t in seen if t.startswith("slice")]
        seen.clear()
        stored = np.transpose(hu, (2, 0, 1))[::-1]                   # (z reversed, x, y)
        st_labels = np.transpose(labels, (2, 0, 1))[::-1]
        perm = np.zeros((4, 4))
        perm[:3, :3] = affine[:3, :3][:, [2, 0, 1]]
        perm[:, 0] *= -1
        perm[:3, 3] = affine[:3, 3] + affine[:3, 2] * (hu.shape[2] - 1)
        perm[3, 3] = 1
        montage(stored, st_labels, perm, class_names=CLASSES, n_slices=3, axial_axis=axial_axis)
        other = [t for t in seen if t.startswith("slice")]
    finally:
        preview._text = real
    n = hu.shape[2]
    flipped = [f"slice {n - 1 - int(t.split()[1])}  z {t.split('z ')[1]}" for t in plain]
    assert sorted(other) == sorted(flipped)                      # same z positions, the input's own indices
