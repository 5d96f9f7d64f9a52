"""The benchmark scripts: statistics by hand, and each script's smoke preset end to end (tiny
phantoms, a handful of steps) with the results schema of issue 6 checked on the real files."""
from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")
pytest.importorskip("torch")
pytest.importorskip("matplotlib")

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import _common as C  # noqa: E402
import deploy  # noqa: E402
import kd_ablation  # noqa: E402

from regionkd.sdk.timing import STAGES  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def run(command, argv):
    return command.main(args=[str(a) for a in argv], standalone_mode=False)


# ----------------------------------------------------------------------------- statistics by hand

def test_pooled_std_and_mean_std_by_hand():
    # SS: (0.5, 0.7) -> 0.02; (0.1, 0.2, 0.3) -> 0.02; dof 1 + 2 = 3
    sd, dof = C.pooled_std([[0.5, 0.7], [0.1, 0.2, 0.3], [0.9]])
    assert dof == 3 and sd == pytest.approx(math.sqrt(0.04 / 3))
    assert C.pooled_std([[0.4], [0.2]]) == (None, 0)
    m, s, n = C.mean_std([0.2, 0.4, None])
    assert (m, n) == (pytest.approx(0.3), 2) and s == pytest.approx(math.sqrt(0.02))


def test_bootstrap_interval_brackets_the_mean():
    vals = [0.1, 0.3, 0.2, 0.5, 0.4, 0.35, 0.25, 0.15]
    lo, hi = C.bootstrap_ci(vals)
    assert min(vals) <= lo < np.mean(vals) < hi <= max(vals)
    assert C.bootstrap_ci([0.3, 0.3, 0.3]) == (0.3, 0.3)
    assert C.bootstrap_ci([0.3]) == (None, None)


def _row(arch, role, kd, seed, tumour, liver=0.9, cases=None):
    cases = cases or {"a": {"liver": liver, "tumour": tumour}}
    return {"task": "liver", "arch": arch, "role": role, "kd": kd, "seed": seed,
            "dice": {"liver": liver, "tumour": tumour}, "dice_per_case": cases,
            "loss_final": {"seg": 0.2, "pmd": None, "imd": None, "rad": None}}


def test_analysis_improvement_gap_closed_and_spread_by_hand():
    rows = [_row("raunet", "teacher", "none", 0, 0.8),
            _row("enet", "student", "none", 0, 0.5), _row("enet", "student", "none", 1, 0.6),
            _row("enet", "student", "pmd", 0, 0.65), _row("enet", "student", "pmd", 1, 0.75)]
    an = kd_ablation.analyse(rows)
    pmd = next(e for e in an["stats"] if e["setting"] == "pmd")
    assert pmd["dice"]["tumour"]["mean"] == pytest.approx(0.7)
    assert pmd["rel_improvement"]["tumour"] == pytest.approx(0.15 / 0.55)     # (0.70 - 0.55) / 0.55
    assert pmd["gap_closed"]["tumour"] == pytest.approx(0.15 / 0.25)          # / (0.80 - 0.55)
    none = next(e for e in an["stats"] if e["setting"] == "none")
    assert none["teacher_gap"]["tumour"] == pytest.approx(0.25)
    # both settings: SD over 2 seeds = sqrt(0.005); pooled the same; SD of a 2-seed mean difference = that * 1
    assert an["seed_spread"] == pytest.approx(math.sqrt(0.005))
    assert an["se_diff"] == pytest.approx(math.sqrt(0.005))
    assert an["detectable_0.02"] is False                                     # 0.02 < 2 * 0.0707


def test_deploy_derived_numbers_by_hand():
    def row(runtime, precision, role, median, infer_ms, nbytes):
        return {"arch": "x", "runtime": runtime, "precision": precision, "role": role, "slices": 10,
                "gflops_per_slice": 0.5, "bytes": nbytes, "outside_inference_share": 0.1,
                "latency_ms": {"median": median, "p95": median}, "breakdown_ms": {"inference": infer_ms}}
    rows = [row("torch", "fp32", "teacher", 1200.0, 1000.0, 8000), row("torch", "fp32", "student", 300.0, 250.0, 400),
            row("onnxruntime", "fp32", "student", 150.0, 100.0, 400), row("onnxruntime", "int8", "student", 100.0, 50.0, 100)]
    ratios = deploy.derive(rows, {"gflops_per_s": 100.0})
    assert rows[2]["achieved_gflops_per_s"] == pytest.approx(50.0)           # 0.5 GFLOP x 10 slices / 0.1 s
    assert rows[2]["share_of_sgemm"] == pytest.approx(0.5)
    assert ratios["teacher_torch / student_torch latency"] == pytest.approx(4.0)
    assert ratios["student_torch / student_sdk_fp32 latency"] == pytest.approx(2.0)
    assert ratios["sdk fp32 / int8 latency"] == pytest.approx(1.5)
    assert ratios["sdk fp32 / int8 size"] == pytest.approx(4.0)
    assert ratios["teacher_torch / best student_sdk latency"] == pytest.approx(12.0)
    assert ratios["best_sdk"] == "onnxruntime int8"


# ----------------------------------------------------------------------------- kd_ablation smoke

@pytest.fixture(scope="module")
def ablation(tmp_path_factory):
    base = tmp_path_factory.mktemp("kd")
    work, results = base / "work", base / "results"
    assert run(kd_ablation.main, ["--preset", "smoke", "--work", work, "--results", results, "--quiet"]) == 0
    return work, results


def test_kd_ablation_smoke_rows_follow_the_schema(ablation):
    work, results = ablation
    rows = json.loads((results / "kd_ablation-smoke.json").read_text())
    assert (results / "kd_ablation-smoke.png").read_bytes()[:8] == PNG_MAGIC
    md = (results / "kd_ablation-smoke.md").read_text()
    assert "| tinynet | pmd+imd+rad |" in md and "Seed-to-seed spread" in md and "--preset smoke" in md
    teachers = [r for r in rows if r["role"] == "teacher"]
    assert [(r["task"], r["arch"], r["kd"]) for r in teachers] == [("liver", "raunet", "none")]
    students = [r for r in rows if r["role"] == "student"]
    assert sorted((r["arch"], r["kd"], r["seed"]) for r in students) == sorted(
        ("tinynet", kd, s) for kd in ("none", "pmd", "pmd+imd", "pmd+imd+rad") for s in (0, 1))
    for r in rows:
        assert {"task", "arch", "role", "kd", "seed", "dice"} <= set(r)
        assert set(r["dice"]) == {"liver", "tumour"}                     # class names as in the manifest
        assert all(v is None or 0.0 <= v <= 1.0 for v in r["dice"].values())
        # the per-case mean is the mean of the per-case values (cases with an empty reference left out)
        for c in ("liver", "tumour"):
            vals = [per[c] for per in r["dice_per_case"].values() if per[c] is not None]
            ev = json.loads((work / (r["checkpoint"][:-3] + ".eval.json")).read_text())
            kept = [cid for cid in r["dice_per_case"] if ev["cases"][cid][c]["ref_voxels"] > 0]
            if kept:
                assert r["dice"][c] == pytest.approx(np.mean([r["dice_per_case"][k][c] for k in kept]))
            # cases without the class in the reference are None, so paired intervals use the same cases
            assert [cid for cid in r["dice_per_case"] if r["dice_per_case"][cid][c] is not None] == kept
            assert len(vals) == len(kept)
        # each loss term is logged exactly when that term is trained
        terms = set(r["kd"].split("+")) if r["kd"] != "none" else set()
        for t in ("pmd", "imd", "rad"):
            assert (r["loss_final"][t] is not None) == (t in terms), (r["kd"], t)
        assert r["loss_final"]["seg"] > 0


def test_kd_ablation_dice_matches_a_hand_computed_dice(ablation):
    """Re-segment one validation case with the student and compute Dice with numpy."""
    import nibabel as nib

    from regionkd.train.checkpoint import load_model
    from regionkd.train.data import open_dataset
    from regionkd.train.evaluate import predict_volume

    work, results = ablation
    row = next(r for r in json.loads((results / "kd_ablation-smoke.json").read_text())
               if r["kd"] == "pmd" and r["seed"] == 1)
    model, ck = load_model(work / row["checkpoint"])
    ds = open_dataset(work / "liver" / "data")
    cid = next(iter(row["dice_per_case"]))
    case = ds.load_case(cid)
    pred = case.volume.to_original(predict_volume(model, case.volume, ck["preprocessing"]["window"],
                                                  tuple(ck["preprocessing"]["input_size"])))
    ref = np.asarray(nib.load(case.label_path).dataobj).astype(np.uint8)
    assert pred.shape == ref.shape
    for lab, name in ((1, "liver"), (2, "tumour")):
        p, g = pred == lab, ref == lab
        if not g.any():                                   # left out, as in the mean
            assert row["dice_per_case"][cid][name] is None
            continue
        assert row["dice_per_case"][cid][name] == pytest.approx(2.0 * (p & g).sum() / (p.sum() + g.sum()))


def test_kd_ablation_resumes_without_retraining(ablation):
    work, results = ablation
    ckpts = sorted((work / "liver").glob("*.pt"))
    before = {p: p.stat().st_mtime_ns for p in ckpts}
    rows_before = json.loads((results / "kd_ablation-smoke.json").read_text())
    assert run(kd_ablation.main, ["--preset", "smoke", "--work", work, "--results", results, "--quiet"]) == 0
    assert {p: p.stat().st_mtime_ns for p in ckpts} == before
    rows_after = json.loads((results / "kd_ablation-smoke.json").read_text())
    assert [r["dice"] for r in rows_after] == [r["dice"] for r in rows_before]


def test_kd_ablation_sweep_records_weights(ablation):
    work, results = ablation
    assert run(kd_ablation.main, ["--preset", "smoke", "--sweep", "--work", work, "--results", results, "--quiet"]) == 0
    rows = json.loads((results / "kd_ablation-smoke-sweep.json").read_text())
    students = [r for r in rows if r["role"] == "student"]
    assert {r["setting"] for r in students} == {"none", "paper", "imd0.1"}
    paper = next(r for r in students if r["setting"] == "paper")
    small = next(r for r in students if r["setting"] == "imd0.1")
    assert (paper["alpha"], paper["beta1"], paper["beta2"], paper["temperature"]) == (0.1, 0.9, 0.9, 4.0)
    assert small["beta1"] == 0.1 and small["kd"] == "pmd+imd+rad"
    md = (results / "kd_ablation-smoke-sweep.md").read_text()
    assert "best setting" in md and "0.1/0.1/0.9, T=4" in md
    assert (results / "kd_ablation-smoke-sweep.png").read_bytes()[:8] == PNG_MAGIC


def test_paper_preset_without_gpu_says_so_and_skips(tmp_path, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is present: the paper preset would really train")
    assert run(kd_ablation.main, ["--preset", "paper", "--work", tmp_path / "w", "--results", tmp_path / "r"]) == 0
    assert "needs a CUDA GPU" in capsys.readouterr().err
    assert not (tmp_path / "r").exists() and not (tmp_path / "w").exists()


# ----------------------------------------------------------------------------- deploy smoke

def test_deploy_smoke_rows_follow_the_schema(tmp_path):
    from regionkd.sdk.bundle import load_bundle
    from regionkd.train.checkpoint import load_model
    from regionkd.train.models.profile import flops_per_slice

    work, results = tmp_path / "work", tmp_path / "results"
    assert run(deploy.main, ["--preset", "smoke", "--work", work, "--results", results, "--also-student", "tinynet",
                             "--quiet"]) == 0
    rows = json.loads((results / "deploy-smoke.json").read_text())
    assert (results / "deploy-smoke.png").read_bytes()[:8] == PNG_MAGIC
    md = (results / "deploy-smoke.md").read_text()
    assert "teacher_torch / best student_sdk latency" in md and "numpy float32 matmul" in md

    sgemm = [r for r in rows if r["runtime"] == "numpy-sgemm"]
    assert len(sgemm) == 1 and sgemm[0]["gflops_per_s"] > 0 and sgemm[0]["threads"] == 1
    measured = [r for r in rows if "latency_ms" in r]
    assert [(r["arch"], r["runtime"], r["precision"]) for r in measured][:4] == [
        ("raunet", "torch", "fp32"), ("enet", "torch", "fp32"), ("enet", "onnxruntime", "fp32"),
        ("enet", "onnxruntime", "int8")]
    bundle = load_bundle(work / "bundle")
    for r in measured:
        assert {"arch", "runtime", "precision", "volume_shape", "latency_ms", "breakdown_ms", "bytes", "params",
                "gflops_per_slice"} <= set(r)
        assert r["volume_shape"] == [64, 64, 8] and r["slices"] == 8
        assert 0 < r["latency_ms"]["median"] <= r["latency_ms"]["p95"]
        assert set(r["breakdown_ms"]) == set(STAGES) and all(v > 0 for v in r["breakdown_ms"].values())
        assert r["share_of_sgemm"] == pytest.approx(r["achieved_gflops_per_s"] / sgemm[0]["gflops_per_s"])
    for r in measured[2:4]:
        assert r["bytes"] == (bundle.root / r["model_file"]).stat().st_size
        assert r["params"] == bundle.params
    assert measured[3]["bytes"] < measured[2]["bytes"]                        # int8 file smaller than fp32
    teacher, _ = load_model(work / "teacher-raunet.pt")
    assert measured[0]["params"] == sum(p.numel() for p in teacher.parameters())
    assert measured[0]["gflops_per_slice"] == pytest.approx(flops_per_slice(teacher, (64, 64)) / 1e9)
    fp32_dice = measured[2]["dice"]
    assert fp32_dice == bundle.manifest["metrics"]["fp32"]["dice"]
    assert measured[3]["dice_minus_fp32"] == {c: pytest.approx(v - fp32_dice[c]) for c, v in measured[3]["dice"].items()}
    ratios = sgemm[0]["ratios"]
    assert ratios["teacher_torch / student_torch latency"] == pytest.approx(
        measured[0]["latency_ms"]["median"] / measured[1]["latency_ms"]["median"])
    # --also-student: the second student is timed after the first, against the same teacher row
    assert [(r["arch"], r["runtime"], r["precision"]) for r in measured][4:7] == [
        ("tinynet", "torch", "fp32"), ("tinynet", "onnxruntime", "fp32"), ("tinynet", "onnxruntime", "int8")]
    by_student = sgemm[0]["ratios_by_student"]
    assert list(by_student) == ["enet", "tinynet"] and by_student["enet"] == ratios
    assert by_student["tinynet"]["teacher_torch / student_torch latency"] == pytest.approx(
        measured[0]["latency_ms"]["median"] / measured[4]["latency_ms"]["median"])
    assert "| tinynet |" in md and (work / "bundle-tinynet" / "manifest.json").is_file()
    import torch

    if not torch.cuda.is_available():
        assert not any(r["runtime"].startswith("tensorrt") for r in rows)


def test_scripts_have_help():
    from click.testing import CliRunner

    for command, word in ((kd_ablation.main, "--sweep"), (deploy.main, "--bundle")):
        result = CliRunner().invoke(command, ["--help"])
        assert result.exit_code == 0 and word in result.output and "--quiet" in result.output


def test_phantom_dataset_is_reused_and_a_different_one_refused(ablation):
    from regionkd.sdk.errors import InputError

    work, _ = ablation
    data = work / "liver" / "data"
    stamp = (data / C.DONE_MARKER).stat().st_mtime_ns
    assert C.make_phantom_dataset(data, "liver", 4, (64, 64, 8), 0) == data        # the smoke preset's dataset
    assert (data / C.DONE_MARKER).stat().st_mtime_ns == stamp
    with pytest.raises(InputError, match="another phantom dataset"):
        C.make_phantom_dataset(data, "liver", 5, (64, 64, 8), 0)


@pytest.mark.parametrize("command, args, message", [
    (kd_ablation.main, ["--settings", "paper"], "add --sweep"),
    (kd_ablation.main, ["--sweep", "--settings", "paper,bogus"], "bogus: unknown"),
    (kd_ablation.main, ["--teacher", "bogus"], "unknown network"),
    (deploy.main, ["--also-student", "bogus"], "unknown network"),
])
def test_bad_options_are_refused_before_any_work(tmp_path, command, args, message):
    from click.testing import CliRunner

    from regionkd.sdk.errors import InputError

    result = CliRunner().invoke(command, ["--preset", "smoke", "--work", str(tmp_path / "w"),
                                          "--results", str(tmp_path / "r"), "--quiet", *args])
    assert isinstance(result.exception, InputError) and message in str(result.exception)
    assert not (tmp_path / "w").exists() and not (tmp_path / "r").exists()
