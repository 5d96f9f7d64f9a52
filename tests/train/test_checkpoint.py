"""Checkpoint format regionkd-checkpoint/1: atomic save, weights-only load, clear errors."""

import numpy as np
import pytest
import torch

from regionkd.sdk.errors import InputError, RegionKDError
from regionkd.train.checkpoint import (FORMAT, CheckpointError, load_checkpoint, load_model, log_path_for,
                                       save_checkpoint)
from regionkd.train.models import create_model


def make_ckpt(model, **over):
    ckpt = {
        "format": FORMAT, "arch": "tinynet", "role": "student", "num_classes": 3,
        "class_names": ["background", "liver", "tumour"], "task": "liver",
        "preprocessing": {"window": [-60.0, 140.0], "input_size": [64, 64], "orientation": "RAS",
                          "slice_axis": "axial", "normalisation": {"type": "window-linear", "range": [-1, 1]}},
        "model_state": model.state_dict(),
        "train_state": {"epoch": 1, "step": 7, "rng": {"torch": torch.get_rng_state()}},
        "provenance": {"teacher": None, "kd": [], "seed": 0},
        "metrics": {"val": {"liver": 0.5, "tumour": None}},
        "config": {"arch": "tinynet", "betas": [0.9, 0.999]},
    }
    ckpt.update(over)
    return ckpt


@pytest.fixture()
def model():
    torch.manual_seed(0)
    return create_model("tinynet", num_classes=3)


def test_roundtrip_weights_only_and_same_outputs(tmp_path, model):
    path = save_checkpoint(tmp_path / "sub" / "m.pt", make_ckpt(model))
    # no temp files left beside it
    assert sorted(p.name for p in path.parent.iterdir()) == ["m.pt"]
    torch.load(path, weights_only=True)  # the contract: plain types only
    ckpt = load_checkpoint(path)
    assert ckpt["train_state"]["step"] == 7 and ckpt["metrics"]["val"]["tumour"] is None
    loaded, ckpt2 = load_model(path)
    assert not loaded.training
    x = torch.randn(2, 1, 64, 64)
    model.eval()
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    assert ckpt2["class_names"] == ["background", "liver", "tumour"]


def test_failed_save_keeps_previous_file(tmp_path, model):
    path = save_checkpoint(tmp_path / "m.pt", make_ckpt(model))
    before = path.read_bytes()
    with pytest.raises(CheckpointError):
        save_checkpoint(path, make_ckpt(model, role="oracle"))
    assert path.read_bytes() == before


@pytest.mark.parametrize("content, message", [
    (b"", "empty"),
    (b"this is not a torch file at all", "not a readable"),
])
def test_corrupt_files(tmp_path, content, message):
    p = tmp_path / "bad.pt"
    p.write_bytes(content)
    with pytest.raises(CheckpointError, match=message) as info:
        load_checkpoint(p)
    assert str(p) in str(info.value)
    assert isinstance(info.value, InputError) and isinstance(info.value, RegionKDError)


def test_truncated_file(tmp_path, model):
    path = save_checkpoint(tmp_path / "m.pt", make_ckpt(model))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="not a readable"):
        load_checkpoint(path)


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "nope.pt")


def test_unknown_format_and_missing_keys(tmp_path, model):
    p = tmp_path / "old.pt"
    ckpt = make_ckpt(model, format="regionkd-checkpoint/0")
    torch.save(ckpt, p)
    with pytest.raises(CheckpointError, match="unknown format 'regionkd-checkpoint/0'"):
        load_checkpoint(p)
    ckpt = make_ckpt(model)
    del ckpt["class_names"]
    torch.save(ckpt, p)
    with pytest.raises(CheckpointError, match="missing keys \\['class_names'\\]"):
        load_checkpoint(p)


def test_pickled_objects_are_refused(tmp_path, model):
    """A file holding a numpy array (a pickled class) must not load under weights_only."""
    p = tmp_path / "np.pt"
    torch.save(make_ckpt(model, metrics={"val": np.array([0.5])}), p)
    with pytest.raises(CheckpointError, match="not a readable"):
        load_checkpoint(p)


def test_weights_that_do_not_fit_the_arch(tmp_path, model):
    p = save_checkpoint(tmp_path / "m.pt", make_ckpt(model, arch="enet"))
    with pytest.raises(CheckpointError, match="do not fit architecture 'enet'"):
        load_model(p)


def test_inconsistent_classes(tmp_path, model):
    with pytest.raises(CheckpointError, match="2 class names for num_classes=3"):
        save_checkpoint(tmp_path / "m.pt", make_ckpt(model, class_names=["background", "liver"]))


def test_log_path_is_beside_the_checkpoint(tmp_path):
    assert log_path_for(tmp_path / "teacher.pt") == tmp_path / "teacher.log.jsonl"
