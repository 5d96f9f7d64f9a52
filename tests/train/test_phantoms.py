"""Phantoms: deterministic, anatomically plausible HU, labels in the dataset convention,
confounders labelled the way the issue says, and a task a single HU threshold cannot solve."""
import hashlib
import json

import numpy as np
import pytest

from regionkd.train.data.phantom_anatomy import T
from regionkd.train.data.phantoms import case_rng, draw_geometry, generate_phantom
from regionkd.train.metrics import best_threshold_dice

SHAPE = (96, 96, 32)


def test_best_threshold_dice_on_hand_made_values():
    # tumour = {9, 10}: the threshold >= 9 is perfect
    assert best_threshold_dice([1, 2, 3, 9, 10], [0, 0, 0, 1, 1]) == pytest.approx(1.0)
    # dark tumour {1}: best is <= 1, Dice 1
    assert best_threshold_dice([1, 5, 6], [1, 0, 0]) == pytest.approx(1.0)
    # ties cannot be split: values [5, 5] with one positive -> Dice 2*1/(1+2) = 2/3
    assert best_threshold_dice([5, 5], [1, 0]) == pytest.approx(2 / 3)


@pytest.mark.parametrize("task", ["liver", "kidney"])
def test_same_seed_same_voxels(task):
    a = generate_phantom(task, SHAPE, seed=7, index=1)
    b = generate_phantom(task, SHAPE, seed=7, index=1)
    c = generate_phantom(task, SHAPE, seed=7, index=2)
    assert a.hu.dtype == np.int16 and a.label.dtype == np.uint8 and a.hu.shape == SHAPE
    np.testing.assert_array_equal(a.hu, b.hu)
    np.testing.assert_array_equal(a.label, b.label)
    np.testing.assert_array_equal(a.affine, b.affine)
    assert not np.array_equal(a.hu, c.hu)


def test_spacing_ranges_follow_the_matrix():
    for i in range(20):
        g = draw_geometry(case_rng(0, i), "liver", (512, 512, 100))
        sx, sy, sz = g.spacing
        assert 0.6 <= sx <= 0.9 and sx == sy and 1.2 <= sz <= 5.0
        g = draw_geometry(case_rng(0, i), "liver", (256, 256, 48))
        assert 1.2 <= g.spacing[0] <= 1.8 and 2.5 <= g.spacing[2] <= 5.0      # FOV of a 512 matrix; >= 120 mm in z


def test_hu_of_tissues_and_label_convention():
    p = generate_phantom("liver", (128, 128, 40), seed=0, index=0)
    med = {t: float(np.median(p.hu[p.tissue == t])) for t in np.unique(p.tissue)}
    assert med[T.AIR] < -900                          # outside the body
    assert -130 < med[T.SUBCUT_FAT] < -70
    assert 20 < med[T.MUSCLE] < 75
    assert med[T.MARROW] > 120 and med[T.BONE] > 300  # cortical shell blurred into neighbours at 3 mm pixels
    assert 45 < med[T.LIVER] < 125
    assert set(np.unique(p.label)) <= {0, 1, 2}
    # organ label = liver incl. its vessels and cysts; heart, stomach, IVC, spleen are background
    for t in (T.LIVER, T.LIVER_VESSEL, T.LIVER_CYST):
        assert np.all(p.label[p.tissue == t] == 1)
    for t in (T.HEART, T.STOMACH_WALL, T.IVC, T.SPLEEN, T.GALLBLADDER, T.KIDNEY_CORTEX):
        assert np.all(p.label[p.tissue == t] == 0)
    assert np.all((p.label == 2) == (p.tissue == T.LIVER_TUMOUR))


def test_confounders_are_present_at_liver_like_density():
    seen, near = set(), []
    for i in range(4):
        p = generate_phantom("liver", (128, 128, 40), seed=1, index=i)
        seen |= set(np.unique(p.tissue).tolist())
        liver = p.info["liver_hu"]
        for t in (T.HEART, T.IVC, T.SPLEEN):
            if (p.tissue == t).sum() > 50:
                near.append(abs(float(np.median(p.hu[p.tissue == t])) - liver))
    assert {T.LIVER_VESSEL, T.LIVER_CYST, T.HEART, T.STOMACH_WALL, T.SPLEEN, T.IVC, T.BOWEL_AIR} <= seen
    assert near and max(near) < 30.0                  # touching organs within 30 HU of the liver


def test_kidney_labels_follow_kits19():
    p = generate_phantom("kidney", (128, 128, 40), seed=0, index=0)
    assert set(np.unique(p.label)) <= {0, 1, 2} and (p.label == 1).any()
    for t in (T.KIDNEY_CORTEX, T.KIDNEY_MEDULLA, T.RENAL_PELVIS, T.KIDNEY_CYST):
        assert np.all(p.label[p.tissue == t] == 1)
    assert np.all(p.label[p.tissue == T.LIVER] == 0)
    assert np.all((p.label == 2) == (p.tissue == T.KIDNEY_TUMOUR))


@pytest.mark.parametrize("task", ["liver", "kidney"])
def test_best_single_threshold_inside_the_organ_is_poor(task):
    """Pooled over several small cases, no HU threshold (either polarity) inside the true organ
    mask reaches tumour Dice 0.5."""
    values, targets = [], []
    for i in range(8):
        p = generate_phantom(task, (192, 192, 48), seed=0, index=i)
        organ = p.label > 0
        values.append(p.hu[organ].astype(np.float64))
        targets.append(p.label[organ] == 2)
    target = np.concatenate(targets)
    assert target.sum() > 100                         # there are tumours to find
    dice = best_threshold_dice(np.concatenate(values), target)
    print(f"{task}: best-threshold tumour Dice {dice:.3f}")
    assert 0.0 < dice < 0.5


@pytest.mark.parametrize("task", ["liver", "kidney"])
def test_tiny_thick_slice_phantoms_generate(task):
    """With 8 slices over 120 mm a small lesion can fall between slice centres; that must not crash."""
    for seed, index in [(2021, 0), (0, 1), (1, 2)]:
        ph = generate_phantom(task, shape=(64, 64, 8), seed=seed, index=index)
        assert ph.hu.shape == (64, 64, 8) and set(np.unique(ph.label)) <= {0, 1, 2}


def test_noise_is_that_of_the_512_matrix_averaged_into_larger_voxels():
    full = generate_phantom("liver", (512, 512, 8), seed=3)
    small = generate_phantom("liver", (128, 128, 8), seed=3)
    assert 10.0 <= full.info["noise_sigma_hu"] <= 25.0
    assert full.info["voxel_noise_sigma_hu"] == pytest.approx(full.info["noise_sigma_hu"])
    assert small.info["voxel_noise_sigma_hu"] == pytest.approx(small.info["noise_sigma_hu"] * 128 / 512)
    # measured in the air around the body: differences of neighbouring voxels (the smooth bias field
    # cancels), robust spread (the clip at -1024 HU cuts a tail)
    def air_noise(p):
        both_air = (p.tissue[1:] == T.AIR) & (p.tissue[:-1] == T.AIR)
        diff = np.diff(p.hu.astype(np.float64), axis=0)[both_air]
        return 1.4826 * float(np.median(np.abs(diff - np.median(diff))))
    assert air_noise(small) == pytest.approx(air_noise(full) * 128 / 512, rel=0.35)


def test_lesion_contrast_scales_the_same_lesions_hu_difference():
    # a case with lesions: same geometry and labels, the tumours' HU difference to the liver scaled
    for index in range(10):
        a = generate_phantom("liver", SHAPE, seed=3, index=index, min_lesion_mm=20)
        if (a.label == 2).sum() > 50:
            break
    b = generate_phantom("liver", SHAPE, seed=3, index=index, min_lesion_mm=20, lesion_contrast=2.0)
    np.testing.assert_array_equal(a.label, b.label)
    from scipy.ndimage import binary_dilation

    away = ~binary_dilation(a.label == 2, iterations=4)      # edges are soft and blurred along z
    assert np.abs(a.hu[away].astype(int) - b.hu[away]).max() <= 1             # z blur reaches a voxel or two further
    assert [t["contrast_hu"] * 2 for t in a.info["tumours"]] == pytest.approx([t["contrast_hu"] for t in b.info["tumours"]])
    tumour = a.label == 2
    base = float(np.median(a.hu[a.tissue == T.LIVER]))
    da = np.abs(a.hu[tumour].astype(float) - base).mean()
    db = np.abs(b.hu[tumour].astype(float) - base).mean()
    assert 1.5 < db / da < 2.5                   # partial volume and noise keep it from exactly 2
    with pytest.raises(ValueError, match="lesion_contrast"):
        generate_phantom("liver", SHAPE, seed=3, index=0, lesion_contrast=0.0)


def _digest(p) -> str:
    h = hashlib.sha256()
    for a in (p.hu, p.label, p.tissue, p.affine):
        h.update(np.ascontiguousarray(a).tobytes())
    h.update(json.dumps(p.info, sort_keys=True, default=float).encode())
    return h.hexdigest()[:16]


@pytest.mark.parametrize("task, shape, seed, index, min_lesion_mm, contrast, digest", [
    ("liver", (48, 48, 16), 3, 0, 0.0, 1.0, "5366d311e7a9c912"),
    ("liver", (48, 48, 16), 3, 1, 10.0, 2.0, "a08310401a0e7513"),
    ("kidney", (48, 48, 16), 5, 0, 0.0, 1.0, "ed9c8b514a0b5249"),
    ("kidney", (64, 48, 12), 5, 2, 15.0, 1.0, "1d29f3214c04525e"),
])
def test_pinned_cases_keep_every_voxel(task, shape, seed, index, min_lesion_mm, contrast, digest):
    """Phantoms are a fixed data set: every voxel, label and info value of these cases is pinned
    (with the numpy and scipy of constraints.txt), so a refactor that draws in another order shows."""
    p = generate_phantom(task, shape, seed=seed, index=index, min_lesion_mm=min_lesion_mm, lesion_contrast=contrast)
    assert _digest(p) == digest


def test_write_phantoms_reports_each_case(tmp_path):
    """The writer behind `regionkd-train phantoms` and the benchmarks: one progress call per case."""
    from regionkd.train.data.phantoms import write_phantoms

    done = []
    written = write_phantoms(tmp_path / "msd", "kidney", "msd", cases=2, shape=(16, 16, 8), progress=done.append)
    assert done == [1, 1] and written["layout"] == "msd" and len(written["case_ids"]) == 2
    assert (tmp_path / "msd" / "dataset.json").is_file()
    images = write_phantoms(tmp_path / "plain", cases=1, shape=(16, 16, 8), images_only=True)
    assert images["layout"] == "lits" and sorted(p.name for p in (tmp_path / "plain").iterdir()) == ["ct-0000.nii.gz"]
