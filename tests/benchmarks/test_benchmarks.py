"""The benchmark scripts: statistics by hand, and each script's smoke preset end to end (tiny
phantoms, a handful of steps) with the results schema checked on the real files."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")
pytest.importorskip("torch")
pytest.importorskip("matplotlib")

import _common as C  # noqa: E402  (benchmarks/ is on pytest's pythonpath: setup.cfg)
import deploy  # noqa: E402
import distill_step_cost  # noqa: E402
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


def _row(arch, role, arm, seed, cases):
    per = {cid: {"liver": 0.9, "tumour": t} for cid, t in cases.items()}
    mean = sum(cases.values()) / len(cases)
    return {"task": "liver", "arch": arch, "role": role, "arm": arm, "seed": seed, "line": "paper",
            "dice": {"liver": 0.9, "tumour": mean}, "dice_per_case": per,
            "loss_final": {"seg": 0.2, "pmd": None, "imd": None, "rad": None}}


def test_analysis_paired_difference_gap_closed_and_spread_by_hand():
    cases = ("a", "b", "c")
    rows = [_row("unet", "teacher", "teacher", 0, dict(zip(cases, (0.8, 0.8, 0.8)))),
            _row("enet", "student", "alone", 0, dict(zip(cases, (0.5, 0.5, 0.6)))),
            _row("enet", "student", "alone", 1, dict(zip(cases, (0.6, 0.6, 0.5)))),
            _row("enet", "student", "pmd", 0, dict(zip(cases, (0.65, 0.7, 0.6)))),
            _row("enet", "student", "pmd", 1, dict(zip(cases, (0.75, 0.7, 0.8))))]
    an = kd_ablation.analyse(rows)
    pmd = next(e for e in an["stats"] if e["arm"] == "pmd")
    alone = next(e for e in an["stats"] if e["arm"] == "alone")
    assert pmd["dice"]["tumour"]["mean"] == pytest.approx(0.7)
    # seed means per case: alone 0.55 each; pmd 0.70, 0.70, 0.70 -> difference 0.15 on every case
    assert pmd["vs_baseline"]["tumour"]["mean"] == pytest.approx(0.15)
    assert pmd["vs_baseline"]["tumour"]["ci"] == pytest.approx([0.15, 0.15])
    assert pmd["gap_closed"]["tumour"] == pytest.approx(0.15 / 0.25)          # / (0.80 - 0.55)
    assert alone["teacher_lead"]["tumour"]["mean"] == pytest.approx(0.25)
    # per-seed means: alone (0.5333, 0.5667), pmd (0.65, 0.75): pooled SD over the two arms
    expected = math.sqrt(((0.5333333 - 0.55) ** 2 * 2 + 0.05 ** 2 * 2) / 2)
    assert an["seed_spread"] == pytest.approx(expected, rel=1e-4)
    assert an["winners"] == [("liver", "enet", "pmd")]
    worse = [dict(r, dice_per_case={c: {"liver": 0.9, "tumour": v["tumour"] - 0.2} for c, v in r["dice_per_case"].items()})
             if r["arm"] == "pmd" else r for r in rows]
    assert kd_ablation.analyse(worse)["winners"] == []


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
    assert ratios["best_sdk"] == "onnxruntime int8 numpy"


# ----------------------------------------------------------------------------- kd_ablation smoke

SMOKE_RUNS = sorted([("tinynet", arm, s) for arm in ("alone", "paper", "pmd") for s in (0, 1)]
                    + [("tinynet", "alone-L3", 0), ("tinynet", "ul-L3", 0)])


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
    assert "| tinynet | ul-L3 | 3 labelled + unlabelled |" in md and "Seed-to-seed spread" in md
    assert "--preset smoke" in md and "## Verdict" in md
    teachers = [r for r in rows if r["role"] == "teacher"]
    assert [(r["task"], r["arch"]) for r in teachers] == [("liver", "tinynet")]
    students = [r for r in rows if r["role"] == "student"]
    assert sorted((r["arch"], r["arm"], r["seed"]) for r in students) == SMOKE_RUNS
    test_ids = {p.name for p in (work / "liver" / "test").glob("volume-*.nii")}
    for r in rows:
        assert {"task", "arch", "role", "arm", "seed", "dice", "learning_curve", "test_cases"} <= set(r)
        assert r["test_cases"] == 2 == len(test_ids)           # scored on the held-out test phantoms
        assert set(r["dice"]) == {"liver", "tumour"}
        assert all(v is None or 0.0 <= v <= 1.0 for v in r["dice"].values())
        assert r["learning_curve"] and all("val_dice" in p for p in r["learning_curve"])
        ev = json.loads((work / (r["checkpoint"][:-3] + ".test.json")).read_text())
        assert all(per["hd95"] is not None for case in ev["cases"].values() for per in case.values()
                   if per["pred_voxels"] and per["ref_voxels"])      # the smoke preset asks for hd95 too
        for c in ("liver", "tumour"):
            kept = [cid for cid in r["dice_per_case"] if ev["cases"][cid][c]["ref_voxels"] > 0]
            if kept:
                assert r["dice"][c] == pytest.approx(np.mean([r["dice_per_case"][k][c] for k in kept]))
            assert [cid for cid in r["dice_per_case"] if r["dice_per_case"][cid][c] is not None] == kept
        if r["role"] == "student":
            terms = set(r["setting"]["kd"].split("+")) - {"none"}
            for t in ("pmd", "imd", "rad"):
                assert (r["loss_final"][t] is not None) == (t in terms), (r["arm"], t)
            assert (r["setting"]["unlabelled"], r["setting"]["labelled"]) == (
                (True, 3) if r["arm"] == "ul-L3" else (False, 3) if r["arm"] == "alone-L3" else (False, None))
            assert (r["teacher_cache"] is not None) == (terms != set())
    # every distilled run used the one teacher cache of the task
    dirs = {r["teacher_cache"]["dir"] for r in students if r["teacher_cache"]}
    assert len(dirs) == 1 and Path(next(iter(dirs))).parent == work / "liver" / "teacher-cache"


def test_kd_ablation_dice_matches_a_hand_computed_dice(ablation):
    """Re-segment one test case with a student through the SDK's Segmenter and compute Dice with numpy."""
    import nibabel as nib

    from regionkd.train.checkpoint import load_model
    from regionkd.train.data import open_dataset
    from regionkd.train.evaluate import segment_case
    from regionkd.train.torch_backend import checkpoint_segmenter

    work, results = ablation
    row = next(r for r in json.loads((results / "kd_ablation-smoke.json").read_text())
               if r["arm"] == "pmd" and r["seed"] == 1)
    model, ck = load_model(work / row["checkpoint"])
    ds = open_dataset(work / "liver" / "test")
    cid = next(iter(row["dice_per_case"]))
    case = ds.load_case(cid)
    pred = segment_case(checkpoint_segmenter(model, ck), case.volume)
    ref = np.asarray(nib.load(case.label_path).dataobj).astype(np.uint8)
    assert pred.shape == ref.shape
    for lab, name in ((1, "liver"), (2, "tumour")):
        p, g = pred == lab, ref == lab
        if not g.any():                                   # left out, as in the mean
            assert row["dice_per_case"][cid][name] is None
            continue
        assert row["dice_per_case"][cid][name] == pytest.approx(2.0 * (p & g).sum() / (p.sum() + g.sum()))


def test_kd_ablation_unlabelled_images_carry_no_labels(ablation):
    work, _ = ablation
    files = sorted(p.name for p in (work / "liver" / "unlabelled").iterdir() if not p.name.startswith("."))
    assert files == ["ct-0000.nii.gz", "ct-0001.nii.gz"]


def test_kd_ablation_resumes_without_retraining(ablation):
    work, results = ablation
    ckpts = sorted((work / "liver").glob("*.pt"))
    before = {p: p.stat().st_mtime_ns for p in ckpts}
    rows_before = json.loads((results / "kd_ablation-smoke.json").read_text())
    assert run(kd_ablation.main, ["--preset", "smoke", "--work", work, "--results", results, "--quiet"]) == 0
    assert {p: p.stat().st_mtime_ns for p in ckpts} == before
    rows_after = json.loads((results / "kd_ablation-smoke.json").read_text())
    assert [r["dice"] for r in rows_after] == [r["dice"] for r in rows_before]


def test_kd_ablation_narrowing_and_unknown_arms(ablation, tmp_path):
    from regionkd.sdk.errors import InputError

    work, _ = ablation
    p = kd_ablation._narrow(kd_ablation.PRESETS["cpu"], "kidney", "enet", "alone,ul-all-classes", "4,5")
    assert p.tasks == ("kidney",) and p.plan == (("enet", "alone", (4, 5)), ("enet", "ul-all-classes", (4, 5)))
    with pytest.raises(InputError, match="unknown"):
        kd_ablation._narrow(kd_ablation.PRESETS["cpu"], None, None, "bogus", None)
    out = tmp_path / "r"
    assert run(kd_ablation.main, ["--preset", "smoke", "--arms", "alone", "--seeds", "0", "--work", work,
                                  "--results", out, "--quiet"]) == 0
    rows = json.loads((out / "kd_ablation-smoke.json").read_text())
    assert [(r["arm"], r["seed"]) for r in rows] == [("teacher", 0), ("alone", 0)]


def test_kd_ablation_report_only_trains_nothing_and_names_what_is_missing(ablation, tmp_path):
    work, _ = ablation
    ckpts = {p: p.stat().st_mtime_ns for p in (work / "liver").glob("*.pt")}
    out = tmp_path / "r"
    assert run(kd_ablation.main, ["--preset", "smoke", "--arms", "alone", "--seeds", "0,5", "--report-only",
                                  "--work", work, "--results", out, "--quiet"]) == 0
    assert {p: p.stat().st_mtime_ns for p in (work / "liver").glob("*.pt")} == ckpts   # nothing trained
    rows = json.loads((out / "kd_ablation-smoke.json").read_text())
    assert [(r["arm"], r["seed"]) for r in rows] == [("teacher", 0), ("alone", 0)]
    assert "Not made yet (1 runs of the plan" in (out / "kd_ablation-smoke.md").read_text()
    assert "liver: tinynet alone seed 5" in (out / "kd_ablation-smoke.md").read_text()


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

    sgemm = [r for r in rows if r.get("runtime") == "numpy-sgemm"]
    assert len(sgemm) == 1 and sgemm[0]["gflops_per_s"] > 0 and sgemm[0]["threads"] == 1
    measured = [r for r in rows if "latency_ms" in r]
    assert [(r["arch"], r["runtime"], r["precision"], r["path"]) for r in measured][:6] == [
        ("raunet", "torch", "fp32", "numpy"), ("enet", "torch", "fp32", "numpy"),
        ("enet", "onnxruntime", "fp32", "numpy"), ("enet", "onnxruntime", "fp32", "fused"),
        ("enet", "onnxruntime", "int8", "numpy"), ("enet", "onnxruntime", "int8", "fused")]
    measured = [r for r in measured if r["path"] == "numpy"]           # the checks below: the numpy-path rows
    bundle = load_bundle(work / "bundle")
    for r in measured:
        assert {"arch", "runtime", "precision", "volume_shape", "latency_ms", "breakdown_ms", "bytes", "params",
                "gflops_per_slice"} <= set(r)
        assert r["volume_shape"] == [64, 64, 8] and r["slices"] == 8
        lat = r["latency_ms"]
        assert 0 < lat["min"] <= lat["median"] and lat["mean"] > 0 and lat["sd"] >= 0
        assert lat["p95"] is None or lat["median"] <= lat["p95"]      # a p95 only from 20 repeats on
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
    assert list(by_student) == ["enet", "tinynet"] and by_student["enet"].items() <= ratios.items()
    # folder throughput of the first student: both precisions, both paths, sequential and pipelined
    folder = [r["folder"] for r in rows if "folder" in r]
    assert [(r["precision"], r["path"], r["pipelined"]) for r in folder] == [
        (pr, path, pipe) for pr in ("fp32", "int8") for path in ("numpy", "fused") for pipe in (False, True)]
    for r in folder:
        assert r["volumes"] == deploy.FOLDER_VOLUMES and r["volumes_per_min"] > 0 and r["floor_ms"] > 0
        assert r["ms_per_volume"] == pytest.approx(r["wall_ms"] / r["volumes"])
        assert r["stages_sum_ms"]["inference"] > 0 and 0 < r["outside_inference_share"] < 1
    floors = sgemm[0]["floors"]
    assert floors["int8"]["floor_ms"] == pytest.approx(floors["int8"]["inflate_ms"] + floors["int8"]["network_ms"])
    assert "Folder throughput" in md and "pipelined folder outside-inference share" in md
    assert by_student["tinynet"]["teacher_torch / student_torch latency"] == pytest.approx(
        measured[0]["latency_ms"]["median"] / measured[4]["latency_ms"]["median"])
    assert "| tinynet |" in md and (work / "bundle-tinynet" / "manifest.json").is_file()
    import torch

    if not torch.cuda.is_available():
        assert not any(r.get("runtime", "").startswith("tensorrt") for r in rows)


def test_scripts_have_help():
    from click.testing import CliRunner

    for command, word in ((kd_ablation.main, "--arms"), (deploy.main, "--bundle"),
                          (distill_step_cost.main, "--arms")):
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
    (kd_ablation.main, ["--arms", "paper,bogus"], "bogus: unknown"),
    (kd_ablation.main, ["--students", "bogus"], "unknown network"),
    (deploy.main, ["--also-student", "bogus"], "unknown network"),
])
def test_bad_options_are_refused_before_any_work(tmp_path, command, args, message):
    from click.testing import CliRunner

    from regionkd.sdk.errors import InputError

    result = CliRunner().invoke(command, ["--preset", "smoke", "--work", str(tmp_path / "w"),
                                          "--results", str(tmp_path / "r"), "--quiet", *args])
    assert isinstance(result.exception, InputError) and message in str(result.exception)
    assert not (tmp_path / "w").exists() and not (tmp_path / "r").exists()
