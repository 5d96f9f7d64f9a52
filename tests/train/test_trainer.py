"""The training loop on tiny phantoms (64x64 slices, a few steps): teacher, student and
distillation end to end, the loss formula, repeatability, resume, clear errors."""
import json
import logging

import pytest
import torch

from tests.training_data import TINY
from regionkd.sdk.errors import InputError, RegionKDError
from regionkd.sdk.bundle import sha256_file
from regionkd.train.checkpoint import CheckpointError, load_checkpoint, load_model, log_path_for
from regionkd.train.config import KD_WEIGHTS, PAPER_KD, PRESETS, field_defaults, make_config
from regionkd.train.distill_loss import DistillLoss, teacher_targets
from regionkd.train.teacher import load_teacher
from regionkd.train.trainer import train



@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="module")
def teacher_ckpt(data, cache, tmp_path_factory):
    """A RAUNet teacher after 2 steps: a real teacher architecture with other channel counts
    than the student's."""
    out = tmp_path_factory.mktemp("teacher") / "teacher.pt"
    train(make_config("teacher", "raunet", data, out, cache_dir=cache, **{**TINY, "max_steps": 2}))
    return out


def read_log(out):
    return [json.loads(line) for line in log_path_for(out).read_text().splitlines()]


def test_teacher_checkpoint(teacher_ckpt, data):
    model, ckpt = load_model(teacher_ckpt)
    assert ckpt["role"] == "teacher" and ckpt["arch"] == "raunet"
    assert ckpt["class_names"] == ["background", "liver", "tumour"] and ckpt["task"] == "liver"
    assert ckpt["preprocessing"]["window"] == [-60.0, 140.0] and ckpt["preprocessing"]["input_size"] == [64, 64]
    assert ckpt["train_state"]["step"] == 2 and ckpt["provenance"]["teacher"] is None
    assert set(ckpt["metrics"]["val"]) == {"liver", "tumour"}
    assert model(torch.zeros(1, 1, 64, 64)).shape == (1, 3, 64, 64)
    steps = [r for r in read_log(teacher_ckpt) if r["event"] == "step"]
    assert [r["step"] for r in steps] == [1, 2]
    assert steps[0]["loss"]["pmd"] is None and steps[0]["loss"]["total"] == pytest.approx(steps[0]["loss"]["seg"])


def test_distill_logs_every_term_and_sums_them(teacher_ckpt, data, cache, tmp_path):
    out = tmp_path / "distilled.pt"
    summary = train(make_config("distill", "tinynet", data, out, teacher=str(teacher_ckpt), cache_dir=cache,
                                kd="pmd,imd,rad", alpha=0.1, beta1=0.9, beta2=0.3, **TINY))
    assert summary["steps"] == 3 and summary["epoch"] == 1
    log = read_log(out)
    steps = [r for r in log if r["event"] == "step"]
    assert len(steps) == 3
    for r in steps:
        loss = r["loss"]
        assert all(isinstance(loss[k], float) for k in ("seg", "pmd", "imd", "rad", "total"))
        assert all(loss[k] >= 0 for k in ("seg", "pmd", "imd", "rad"))
        # beta1 != beta2: a swap of the IMD and RAD weights shows (unless the two terms happen to be equal)
        assert loss["imd"] != pytest.approx(loss["rad"], rel=0.05)
        assert loss["total"] == pytest.approx(loss["seg"] + 0.1 * loss["pmd"] + 0.9 * loss["imd"]
                                              + 0.3 * loss["rad"], abs=1e-5)
        assert r["lr"] > 0
    epochs = [r for r in log if r["event"] == "epoch"]
    assert len(epochs) == 1 and set(epochs[0]["val_dice"]) == {"liver", "tumour"}
    ckpt = load_checkpoint(out)
    assert ckpt["role"] == "student" and ckpt["arch"] == "tinynet"
    prov = ckpt["provenance"]
    assert prov["teacher"]["sha256"] == sha256_file(teacher_ckpt) and prov["teacher"]["arch"] == "raunet"
    assert prov["kd"] == ["pmd", "imd", "rad"] and prov["alpha"] == 0.1 and (prov["beta1"], prov["beta2"]) == (0.9, 0.3)


def test_kd_subset_leaves_other_terms_out(teacher_ckpt, data, cache, tmp_path):
    out = tmp_path / "pmd.pt"
    train(make_config("distill", "tinynet", data, out, teacher=str(teacher_ckpt), cache_dir=cache, kd="pmd",
                      **{**TINY, "max_steps": 1}))
    loss = [r for r in read_log(out) if r["event"] == "step"][0]["loss"]
    assert loss["imd"] is None and loss["rad"] is None
    assert loss["total"] == pytest.approx(loss["seg"] + 1.0 * loss["pmd"], abs=1e-5)   # alpha: the default, 1


def test_teacher_is_frozen_and_gets_no_gradient(teacher_ckpt, data):
    cfg = make_config("distill", "tinynet", data, "unused.pt", teacher=str(teacher_ckpt), **TINY)
    teacher, _ = load_teacher(cfg, ["background", "liver", "tumour"], [-60.0, 140.0], "cpu")
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    bn_before = {k: v.clone() for k, v in teacher.state_dict().items()}
    from regionkd.train.models import create_model
    student = create_model("tinynet", 3)
    x = torch.randn(2, 1, 64, 64)
    y = torch.randint(0, 3, (2, 64, 64))
    logits, feats = student.forward_features(x)
    terms = DistillLoss(cfg, 3, distill=True)(logits, feats, y, teacher_targets(teacher, x, y, 3))
    terms["total"].backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert all(p.grad is not None for p in student.parameters())
    assert all(torch.equal(bn_before[k], v) for k, v in teacher.state_dict().items())  # BN stats untouched


def test_same_seed_same_run_other_seed_other_run(data, cache, tmp_path):
    a = train(make_config("student", "tinynet", data, tmp_path / "a.pt", cache_dir=cache, seed=3, **TINY))
    b = train(make_config("student", "tinynet", data, tmp_path / "b.pt", cache_dir=cache, seed=3, **TINY))
    c = train(make_config("student", "tinynet", data, tmp_path / "c.pt", cache_dir=cache, seed=4, **TINY))
    la = [r["loss"] for r in read_log(tmp_path / "a.pt") if r["event"] == "step"]
    lb = [r["loss"] for r in read_log(tmp_path / "b.pt") if r["event"] == "step"]
    assert la == lb
    assert a["params_sha256"] == b["params_sha256"] != c["params_sha256"]


def test_resume_mid_epoch_gives_the_same_weights(teacher_ckpt, data, cache, tmp_path):
    opts = dict(TINY, epochs=2, teacher=str(teacher_ckpt), cache_dir=cache, kd="pmd,imd,rad")   # 6 steps, 2 epochs
    whole = train(make_config("distill", "tinynet", data, tmp_path / "whole.pt", **opts))
    part = tmp_path / "part.pt"
    first = train(make_config("distill", "tinynet", data, part, pause_after=4, **opts))   # stops inside epoch 2
    assert first["steps"] == 4 and load_checkpoint(part)["train_state"]["step_in_epoch"] == 1
    rest = train(make_config("distill", "tinynet", data, part, resume=True, **opts))
    assert rest["steps"] == 6 and whole["steps"] == 6
    assert rest["params_sha256"] == whole["params_sha256"]
    log = read_log(part)
    assert [r["event"] for r in log].count("resume") == 1
    assert [r["step"] for r in log if r["event"] == "step"] == [1, 2, 3, 4, 5, 6]
    whole_losses = [r["loss"] for r in read_log(tmp_path / "whole.pt") if r["event"] == "step"]
    assert [r["loss"] for r in log if r["event"] == "step"] == whole_losses


def test_resume_refuses_other_options(data, cache, tmp_path):
    out = tmp_path / "s.pt"
    train(make_config("student", "tinynet", data, out, cache_dir=cache, **{**TINY, "max_steps": 1}))
    with pytest.raises(CheckpointError, match="lr: 0.002 -> 0.01"):
        train(make_config("student", "tinynet", data, out, cache_dir=cache, resume=True, **{**TINY, "lr": 0.01}))
    # distillation options mean nothing to a student run: another alpha or T resumes it
    s = train(make_config("student", "tinynet", data, out, cache_dir=cache, resume=True,
                          **{**TINY, "max_steps": 1, "alpha": 0.3, "temperature": 2.0}))
    assert s["steps"] == 1


def test_teacher_with_other_input_size_is_refused(teacher_ckpt, data, cache, tmp_path):
    with pytest.raises(CheckpointError, match="input size"):
        train(make_config("distill", "tinynet", data, tmp_path / "d.pt", teacher=str(teacher_ckpt),
                          cache_dir=cache, **{**TINY, "input_size": 96}))


def test_bad_options_and_missing_data(data, cache, tmp_path):
    with pytest.raises(InputError, match="not a directory"):
        train(make_config("student", "tinynet", tmp_path / "nope", tmp_path / "s.pt", **TINY))
    with pytest.raises(InputError, match="--arch: unknown model 'nonet'"):
        train(make_config("student", "nonet", data, tmp_path / "s.pt", cache_dir=cache, **TINY))
    with pytest.raises(InputError, match="unknown term"):
        make_config("distill", "tinynet", tmp_path, tmp_path / "s.pt", teacher="t.pt", kd="pmd,xyz")
    with pytest.raises(InputError, match="needs --teacher"):
        make_config("distill", "tinynet", tmp_path, tmp_path / "s.pt")
    with pytest.raises(InputError, match="multiple of 32"):
        make_config("student", "tinynet", tmp_path, tmp_path / "s.pt", input_size=100)
    with pytest.raises(TypeError, match="unknown training options") as err:
        make_config("student", "tinynet", tmp_path, tmp_path / "s.pt", input_szie=64)
    assert isinstance(err.value, RegionKDError)


def test_presets():
    paper = make_config("student", "enet", "d", "o.pt", preset="paper")
    assert (paper.input_size, paper.batch_size, paper.epochs, paper.lr) == (384, 16, 30, 1e-2)
    demo_t = make_config("teacher", "raunet", "d", "o.pt", preset="demo")
    demo_s = make_config("distill", "enet", "d", "o.pt", preset="demo", teacher="t.pt")
    assert demo_t.input_size == demo_s.input_size == 96 and (demo_t.epochs, demo_s.epochs) == (12, 16)
    assert make_config("student", "enet", "d", "o.pt", preset="demo", epochs=2).epochs == 2
    # one table: TrainConfig's defaults are the paper preset's sizes and the default KD weights
    defaults = field_defaults()
    assert {k: defaults[k] for k in PRESETS["paper"]} == PRESETS["paper"] and defaults["preset"] == "paper"
    assert {k: defaults[k] for k in KD_WEIGHTS["default"]} == KD_WEIGHTS["default"] != PAPER_KD


def test_cli_teacher_and_clear_error(data, cache, tmp_path, capsys):
    from regionkd.sdk.console import run_cli
    from regionkd.train.cli_training import teacher

    out = tmp_path / "cli.pt"
    run_cli(teacher, ["--data", str(data), "--out", str(out), "--arch", "tinynet", "--preset", "demo",
                      "--input-size", "64", "--batch-size", "2", "--max-steps", "1", "--cache-dir", cache])
    shown = capsys.readouterr()
    assert "validation Dice" in shown.out
    assert "teacher tinynet on cpu (1 process), preset demo: 64 px" in shown.err   # the run's plan, logged
    assert load_checkpoint(out)["train_state"]["step"] == 1
    with pytest.raises(SystemExit) as exc:
        run_cli(teacher, ["--data", str(tmp_path / "missing"), "--out", str(out), "--quiet"])
    assert exc.value.code == 1
    assert "missing: not a directory" in capsys.readouterr().err


def test_worker_processes_do_not_change_the_run(data, cache, tmp_path):
    """Augmentation is seeded per slice, so DataLoader workers give the very same run."""
    a = train(make_config("student", "tinynet", data, tmp_path / "w0.pt", cache_dir=cache, workers=0, **TINY))
    b = train(make_config("student", "tinynet", data, tmp_path / "w2.pt", cache_dir=cache, workers=2, **TINY))
    assert a["params_sha256"] == b["params_sha256"]


def test_training_says_device_preset_and_length_first_and_the_run_is_unchanged(data, cache, tmp_path, caplog,
                                                                              monkeypatch):
    """Before training, the device, the preset and an estimate of the run's length (measured on two
    steps of a copy of the network) are logged; measuring changes nothing in the run."""
    from regionkd.train.trainer import TrainingRun

    caplog.set_level(logging.INFO, logger="regionkd.train")
    opts = {**TINY, "quiet": False}
    loud = train(make_config("student", "tinynet", data, tmp_path / "loud.pt", cache_dir=cache, seed=5, **opts))
    err = caplog.text
    caplog.clear()
    assert "student tinynet on cpu (1 process), preset demo: 64 px, batch 4, 1 epochs x 3 steps" in err
    assert "3 steps to go at about" in err and "s/step (measured here): about" in err
    start = [r for r in read_log(tmp_path / "loud.pt") if r["event"] == "start"][0]
    assert start["estimate"]["device"] == "cpu" and start["estimate"]["steps"] == 3
    assert start["estimate"]["estimated_step_s"] > 0
    monkeypatch.setattr(TrainingRun, "announce", lambda self: {})
    silent = train(make_config("student", "tinynet", data, tmp_path / "silent.pt", cache_dir=cache, seed=5, **opts))
    assert loud["params_sha256"] == silent["params_sha256"]
    monkeypatch.undo()
    paper = {**opts, "preset": "paper", "max_steps": 1}
    train(make_config("student", "tinynet", data, tmp_path / "paper.pt", cache_dir=cache, **paper))
    assert "note: the paper preset (384 px, 30 epochs) is sized for a GPU" in caplog.text


def test_validation_dice_is_the_pooled_dice_of_the_argmax(data, cache):
    """validate() counts with metrics.DiceAccumulator; the same numbers by one-hot sums in torch."""
    import numpy as np

    from regionkd.train.data.slices import SliceCache, SliceDataset
    from regionkd.train.models import create_model
    from regionkd.train.processes import Proc
    from regionkd.train.validation import validate

    ds = SliceDataset(SliceCache.build(data, f"{cache}-val", input_size=(64, 64)), augment=False)
    names = ["background", "liver", "tumour"]
    torch.manual_seed(5)
    net = create_model("tinynet", 3).eval()
    cfg = make_config("student", "tinynet", data, "unused.pt", **{**TINY, "val_max_slices": 25})
    idx = np.unique(np.linspace(0, len(ds) - 1, 25).round().astype(int))
    with torch.no_grad():
        pred = torch.cat([net(torch.stack([ds[int(i)][0] for i in idx[k:k + 4]])).argmax(1) for k in range(0, len(idx), 4)])
    ref = torch.stack([ds[int(i)][1] for i in idx])
    p1, r1 = (torch.nn.functional.one_hot(t, 3).flatten(0, 2).double() for t in (pred, ref))
    inter, size = (p1 * r1).sum(0), p1.sum(0) + r1.sum(0)
    expected = {names[k]: None if size[k] == 0 else round(float(2 * inter[k] / size[k]), 6) for k in (1, 2)}
    assert validate(net, ds, cfg, names, Proc()) == expected
    assert any(v for v in expected.values())          # not only empty classes
