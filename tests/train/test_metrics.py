"""Dice / VOE / RVD / ASSD / HD95 on small volumes with anisotropic spacing, against values
computed by hand, and against a brute-force (pairwise distance) reference on random blobs."""
from __future__ import annotations

import math

import numpy as np
import pytest

from regionkd.sdk.errors import InputError
from regionkd.train.metrics import binary_metrics, case_metrics, reference_present

SPACING3 = (2.0, 1.0, 0.5)


def test_shifted_cube():
    # ref: 3x3x3 cube; pred: the cube shifted one voxel along axis 0 (2 mm).
    ref = np.zeros((7, 7, 7), np.uint8)
    ref[1:4, 1:4, 1:4] = 1
    pred = np.zeros_like(ref)
    pred[2:5, 1:4, 1:4] = 1
    m = case_metrics(pred, ref, SPACING3, [1])[1]
    # overlap 18 voxels: Dice 36/54, Jaccard 18/36
    assert m["dice"] == pytest.approx(2 / 3)
    assert m["voe"] == pytest.approx(0.5)
    assert m["rvd"] == pytest.approx(0.0)
    # each direction: 26 surface voxels; 9 at 2 mm (the exposed face), 1 at 0.5 mm (the other
    # cube's centre lies on this one's face: nearest surface is one voxel along axis 2), 16 at 0
    assert m["assd"] == pytest.approx(18.5 / 26)
    # union of 52 distances sorted: 32 x 0, 2 x 0.5, 18 x 2; 95th percentile at 48.45 -> 2
    assert m["hd95"] == pytest.approx(2.0)


def test_two_single_voxels_distance_uses_spacing():
    ref = np.zeros((3, 7, 7), np.int16)
    pred = np.zeros_like(ref)
    ref[1, 3, 1] = 2
    pred[1, 3, 5] = 2           # 4 voxels apart along axis 2 at 0.5 mm
    m = case_metrics(pred, ref, SPACING3, [2])[2]
    assert (m["dice"], m["voe"], m["rvd"]) == (0.0, 1.0, 0.0)
    assert m["assd"] == pytest.approx(2.0) and m["hd95"] == pytest.approx(2.0)


def test_image_border_voxels_are_surface_like_medpy():
    # ref fills the whole 3x3 image: erosion treats outside as background, so its 8 border
    # voxels are surface. pred: the centre voxel. Spacing 2 mm (rows) x 0.5 mm (columns).
    ref = np.ones((3, 3), np.uint8)
    pred = np.zeros_like(ref)
    pred[1, 1] = 1
    m = case_metrics(pred, ref, (2.0, 0.5), [1])[1]
    corner = math.sqrt(2.0 ** 2 + 0.5 ** 2)
    d_ref = (4 * corner + 2 * 2.0 + 2 * 0.5) / 8    # ref surface -> pred centre
    d_pred = 0.5                                     # centre -> nearest ref border voxel
    assert m["dice"] == pytest.approx(0.2)
    assert m["voe"] == pytest.approx(1 - 1 / 9)
    assert m["rvd"] == pytest.approx(-8 / 9)
    assert m["assd"] == pytest.approx((d_ref + d_pred) / 2)
    # 9 distances sorted: .5 .5 .5 2 2 c c c c; 95th percentile at 7.6 -> c
    assert m["hd95"] == pytest.approx(corner)


def test_several_labels_and_empty_conventions():
    ref = np.zeros((4, 6, 6), np.uint8)
    pred = np.zeros_like(ref)
    ref[1:3, 1:4, 1:4] = 1
    pred[1:3, 1:4, 1:4] = 1             # label 1 perfect
    pred[0, 0, 0] = 3                   # label 3: predicted, absent from the reference
    ref[3, 5, 5] = 2                    # label 2: in the reference, missed by the prediction
    res = case_metrics(pred, ref, SPACING3, [1, 2, 3, 4])
    assert res[1] == {"dice": 1.0, "voe": 0.0, "rvd": 0.0, "assd": 0.0, "hd95": 0.0}
    assert res[2]["dice"] == 0.0 and res[2]["voe"] == 1.0 and res[2]["rvd"] == -1.0
    assert math.isinf(res[2]["assd"]) and math.isinf(res[2]["hd95"])
    assert res[3]["dice"] == 0.0 and math.isnan(res[3]["rvd"]) and math.isinf(res[3]["hd95"])
    assert res[4] == {"dice": 1.0, "voe": 0.0, "rvd": 0.0, "assd": 0.0, "hd95": 0.0}
    assert reference_present(ref, 2) and not reference_present(ref, 3)
    assert binary_metrics(pred == 3, ref == 3, SPACING3, missing_distance=99.0)["assd"] == 99.0


def _brute_force(pred, ref, spacing):
    """Surfaces by explicit 6-neighbour test (outside = background), all pairwise distances."""
    def surface(m):
        padded = np.pad(m, 1)
        inner = np.ones_like(m)
        for axis in range(m.ndim):
            for shift in (-1, 1):
                inner &= np.roll(padded, shift, axis)[1:-1, 1:-1, 1:-1]
        return np.argwhere(m & ~inner) * np.asarray(spacing)

    sp, sr = surface(pred), surface(ref)
    d = np.linalg.norm(sp[:, None, :] - sr[None, :, :], axis=2)
    d_pr, d_rp = d.min(1), d.min(0)
    return (d_pr.mean() + d_rp.mean()) / 2, np.percentile(np.concatenate([d_pr, d_rp]), 95)


def test_random_blobs_match_brute_force():
    from scipy import ndimage

    rng = np.random.default_rng(0)
    for _ in range(3):
        noise = ndimage.gaussian_filter(rng.standard_normal((12, 20, 16)), 2.0)
        ref = noise > 0.05
        pred = np.roll(noise, 1, axis=1) > 0.0
        pred[:, :, 0] |= ref[:, :, 0]    # something touching the image border
        assd, hd95 = _brute_force(pred, ref, SPACING3)
        m = case_metrics(pred.astype(np.uint8), ref.astype(np.uint8), SPACING3, [1])[1]
        assert m["assd"] == pytest.approx(assd, rel=1e-9)
        assert m["hd95"] == pytest.approx(hd95, rel=1e-9)


def test_bad_inputs_are_named():
    a = np.zeros((2, 3, 4), np.uint8)
    with pytest.raises(InputError, match="shape"):
        case_metrics(a, np.zeros((2, 3, 5), np.uint8), SPACING3, [1])
    with pytest.raises(InputError, match="spacing"):
        case_metrics(a, a, (1.0, 1.0), [1])
    with pytest.raises(InputError, match="integer"):
        case_metrics(a.astype(np.float32), a, SPACING3, [1])
