"""evaluate_checkpoint on hand-built volumes whose metrics are known by hand.

The checkpoint holds an intensity-threshold network (one 1x1 convolution, registered for this
test), so the prediction is fixed by the HU values: with x = (HU - 40) / 100 (window [-60, 140])
the logits are (0, 10 x, 20 x - 5): HU <= 40 -> background, 40 < HU <= 90 -> liver, HU > 90 ->
tumour. The files are stored in non-canonical orientations, so a prediction that is not put back
in the file's own voxel order would miss the (asymmetric) reference.
"""
import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from torch import nn

from tests.training_data import write_lits_case
from regionkd.sdk.errors import InputError
from regionkd.train.checkpoint import CheckpointError, save_checkpoint
from regionkd.train.evaluate import count_cases, evaluate_checkpoint
from regionkd.train.models import registry

ARCH = "test-intensity-threshold"


class IntensityThreshold(nn.Module):
    def __init__(self, num_classes=3, in_channels=1):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, num_classes, 1)
        with torch.no_grad():
            self.conv.weight.copy_(torch.tensor([0.0, 10.0, 20.0]).view(3, 1, 1, 1))
            self.conv.bias.copy_(torch.tensor([0.0, 0.0, -5.0]))

    def forward(self, x):
        return self.conv(x)


@pytest.fixture(scope="module", autouse=True)
def threshold_model_registered():
    """Registered only while this module's tests run, so other modules' model lists stay the real ones."""
    registry.register_model(ARCH)(IntensityThreshold)
    yield
    registry._MODELS.pop(ARCH)

# canonical (x, y, z) = (16, 12, 6); liver block 10x10x4 = 400 voxels; tumour block 4x4x2 = 32 voxels inside
SHAPE = (16, 12, 6)
LIVER = (slice(2, 12), slice(1, 11), slice(1, 5))
TUMOUR = (slice(3, 7), slice(2, 6), slice(2, 4))
TUMOUR_HALF = (slice(3, 7), slice(2, 6), slice(2, 3))   # 16 voxels


def volumes(tumour: bool):
    hu = np.full(SHAPE, -100.0, np.float32)
    hu[LIVER] = 60.0
    lab = np.zeros(SHAPE, np.uint8)
    lab[LIVER] = 1
    if tumour:
        hu[TUMOUR] = 120.0
        lab[TUMOUR] = 2
    return hu, lab


# canonical -> file orientation: (flip x, y: "LPS"), and slice axis first with an x flip ("KiTS-like")
def lps(a):
    return a[::-1, ::-1, :].copy(), np.diag([-0.8, -0.7, 2.5, 1.0])


def slice_first(a):
    aff = np.array([[0, 0, -0.8, 0], [0, 0.7, 0, 0], [2.5, 0, 0, 0], [0, 0, 0, 1.0]])
    return np.transpose(a, (2, 1, 0))[:, :, ::-1].copy(), aff


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("lits")
    # case 0: perfect; case 1: reference tumour is half of what the image shows (the other half
    # labelled liver); case 2: no tumour at all (left out of the tumour mean)
    hu, lab = volumes(True)
    write_lits_case(root, 0, *lps(hu), lps(lab)[0])
    hu, lab = volumes(True)
    lab[TUMOUR] = 1
    lab[TUMOUR_HALF] = 2
    h, aff = slice_first(hu)
    write_lits_case(root, 1, h, aff, slice_first(lab)[0])
    hu, lab = volumes(False)
    write_lits_case(root, 2, *lps(hu), lps(lab)[0])
    return root


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    model = IntensityThreshold()
    path = tmp_path_factory.mktemp("ck") / "threshold.pt"
    save_checkpoint(path, {
        "arch": ARCH, "role": "student", "num_classes": 3, "class_names": ["background", "liver", "tumour"],
        "task": "liver", "model_state": model.state_dict(),
        "preprocessing": {"window": [-60.0, 140.0], "input_size": [16, 12], "orientation": "RAS",
                          "slice_axis": "axial", "normalisation": {"type": "window-linear", "range": [-1, 1]}},
        "config": {"val_fraction": 0.2, "split_seed": 0}})
    return path


def case_ids(dataset):
    from regionkd.train.data import open_dataset
    return sorted(open_dataset(dataset).case_ids)


def test_metrics_per_case_and_mean(dataset, ckpt):
    ids = case_ids(dataset)
    assert len(ids) == 3
    res = evaluate_checkpoint(ckpt, dataset, case_ids=ids)
    c0, c1, c2 = (res["cases"][i] for i in ids)
    # case 0: prediction == reference
    assert c0["tumour"]["dice"] == pytest.approx(1.0) and c0["liver"]["dice"] == pytest.approx(1.0)
    assert c0["tumour"]["hd95"] == pytest.approx(0.0)
    # case 1: tumour pred 32 voxels, ref 16 inside it -> 2*16/48; liver pred 368, ref 384 -> 2*368/752
    assert c1["tumour"]["pred_voxels"] == 32 and c1["tumour"]["ref_voxels"] == 16
    assert c1["tumour"]["dice"] == pytest.approx(2 * 16 / 48)
    assert c1["tumour"]["rvd"] == pytest.approx((32 - 16) / 16)
    assert c1["tumour"]["voe"] == pytest.approx(1 - 16 / 32)
    assert c1["liver"]["dice"] == pytest.approx(2 * 368 / 752)
    # case 2: no tumour reference -> left out of the tumour mean, and said so
    assert c2["tumour"]["ref_voxels"] == 0
    assert res["excluded"]["tumour"] == [ids[2]] and res["excluded"]["liver"] == []
    assert any(ids[2] in n and "tumour" in n for n in res["notes"])
    assert res["mean"]["tumour"]["n_cases"] == 2
    assert res["mean"]["tumour"]["dice"] == pytest.approx((1.0 + 2 / 3) / 2)
    assert res["mean"]["liver"]["dice"] == pytest.approx((1.0 + 736 / 752 + 1.0) / 3)


def test_slice_first_file_gets_mm_spacing_of_its_own_axes(dataset, ckpt):
    """Case 1 is stored (z, y, x): the tumour's HD95 in mm must use 2.5 mm along its first axis.
    Pred tumour = ref tumour + one more 4x4 slab one slice (2.5 mm) further along z."""
    ids = case_ids(dataset)
    res = evaluate_checkpoint(ckpt, dataset, case_ids=[ids[1]])
    row = res["cases"][ids[1]]["tumour"]
    # every extra surface voxel of the prediction lies 2.5 mm from the reference; HD95 is that
    assert row["hd95"] == pytest.approx(2.5)
    # ASSD: pred->ref mean (16 x 0 + 16 x 2.5) / 32 = 1.25, ref->pred 0 -> (1.25 + 0) / 2
    assert row["assd"] == pytest.approx(0.625)


def test_default_cases_are_the_checkpoints_validation_split(dataset, ckpt):
    from regionkd.train.data.slices import split_cases
    _, val = split_cases(case_ids(dataset), val_fraction=0.2, seed=0)
    done = []
    res = evaluate_checkpoint(ckpt, dataset, progress=done.append)
    assert res["case_ids"] == list(val) and res["split"] == "validation"
    assert done == [1] * len(val) and count_cases(ckpt, dataset) == len(val)      # what sizes the CLI's bar


def test_errors(dataset, ckpt, tmp_path):
    with pytest.raises(InputError, match="not a directory"):
        evaluate_checkpoint(ckpt, tmp_path / "missing")
    with pytest.raises(InputError, match="no case"):
        evaluate_checkpoint(ckpt, dataset, case_ids=["nope"])
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="bad.pt"):
        evaluate_checkpoint(bad, dataset)


def test_cli_table_and_json(dataset, ckpt, tmp_path):
    from regionkd.train.cli_training import evaluate

    ids = case_ids(dataset)
    out = tmp_path / "eval.json"
    r = CliRunner().invoke(evaluate, [str(ckpt), "--data", str(dataset), "--cases", ",".join(ids),
                                      "--json", str(out), "--quiet"])
    assert r.exit_code == 0, r.output
    assert "mean (n=2)" in r.output and "tumour" in r.output and "left out" in r.output
    saved = json.loads(out.read_text())
    assert saved["mean"]["tumour"]["dice"] == pytest.approx((1.0 + 2 / 3) / 2)
