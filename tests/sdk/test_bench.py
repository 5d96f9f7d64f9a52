"""regionkd-bench: latency statistics, stage breakdown, sizes, JSON report, PyTorch checkpoints."""
from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest

from tests.helpers import run_main

from regionkd.sdk.bench import format_table, percentile, synthetic_ct
from regionkd.sdk.cli_bench import main
from regionkd.sdk.timing import STAGES


def run(argv, capsys):
    return run_main(main, argv, capsys)


def test_percentile_is_numpy_linear():
    assert percentile([10, 20, 30, 40, 50], 95) == pytest.approx(48.0)   # 40 + 0.8 * 10
    assert percentile([7.0], 95) == 7.0


def test_synthetic_ct_has_body_liver_and_tumour():
    data, affine = synthetic_ct((80, 80, 16))
    assert data.dtype == np.int16 and data.shape == (80, 80, 16)
    assert np.allclose(np.diag(affine)[:3], [0.75, 0.75, 2.5])
    coords = [np.linspace(-1, 1, n) for n in data.shape]

    def mean_hu_near(x, y, z, r=2):
        i, j, k = (int(np.abs(c - v).argmin()) for c, v in zip(coords, (x, y, z)))
        return float(data[i - r:i + r + 1, j - r:j + r + 1, k - 1:k + 2].mean())

    assert mean_hu_near(-0.95, -0.95, 0) < -800                 # air outside the body
    assert abs(mean_hu_near(0.6, 0.0, 0) - 40) < 10             # body
    assert abs(mean_hu_near(-0.35, 0.35, 0) - 90) < 10          # liver
    assert abs(mean_hu_near(-0.3, 0.1, 0) - 45) < 10            # the hypodense tumour inside the liver


def test_bench_reports_every_precision_with_stage_breakdown(tiny_bundle, tmp_path, capsys):
    out = tmp_path / "bench.json"
    code, stdout, _ = run([tiny_bundle, "--shape", "24,24,6", "--repeat", "3", "--warmup", "1",
                           "--json", out, "--quiet"], capsys)
    assert code == 0
    report = json.loads(out.read_text())
    rows = report["rows"]
    assert [(r["backend"], r["precision"]) for r in rows] == [("onnxruntime", p) for p in ("fp32", "fp16", "int8")]
    assert {r["model_file"] for r in rows} == {"model.fp32.onnx", "model.fp16.onnx", "model.int8-cpu.onnx"}
    assert report["volume"] == {"source": "synthetic", "shape": [24, 24, 6]}
    for r in rows:
        assert r["status"] == "ok" and r["slices"] == 6 and r["repeat"] == 3 and r["params"] == 6
        assert r["size_bytes"] == (tiny_bundle / r["model_file"]).stat().st_size
        assert r["min_ms"] <= r["median_ms"] <= r["max_ms"] and r["min_ms"] <= r["mean_ms"] <= r["max_ms"]
        assert r["sd_ms"] >= 0 and r["p95_ms"] is None and r["p99_ms"] is None      # 3 runs estimate no tail
        assert r["peak_rss_scope"] == "configuration"
        stages = r["stages_median_ms"]
        assert set(stages) == set(STAGES) and all(v > 0 for v in stages.values())
        share = 1 - stages["inference"] / r["median_ms"]
        assert r["outside_inference_share"] == pytest.approx(share)
        assert r["slices_per_s"] == pytest.approx(6 / (r["median_ms"] / 1000))
        assert r["peak_rss_mb"] > 10 and r["traced_peak_mb"] > 0
    for name in ("tiny-threshold", "fp16", "model", "median ms", "outside %"):
        assert name in stdout


def test_bench_on_a_given_volume_and_unavailable_backend_is_skipped(tiny_bundle, phantom_nifti, tmp_path, capsys):
    out = tmp_path / "bench.json"
    code, stdout, _ = run([tiny_bundle, "--volume", phantom_nifti, "--backends", "onnxruntime,tensorrt",
                           "--precisions", "fp32", "--repeat", "2", "--json", out, "--quiet"], capsys)
    assert code == 0
    rows = json.loads(out.read_text())["rows"]
    assert json.loads(out.read_text())["volume"]["shape"] == [40, 36, 12]
    assert rows[0]["status"] == "ok" and rows[0]["slices"] == 12
    if importlib.util.find_spec("tensorrt") is None:
        assert rows[1]["status"] == "skipped" and "tensorrt" in rows[1]["reason"]
        assert "skipped" in stdout


@pytest.mark.parametrize("args, message", [
    (["--backends", "openvino"], "openvino"),
    (["--precisions", "fp8"], "fp8"),
    (["--shape", "10,10"], "--shape"),
])
def test_bad_options_are_named(tiny_bundle, capsys, args, message):
    code, _, err = run([tiny_bundle, *args, "--quiet"], capsys)
    assert code == 2 and message in err


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None, reason="TensorRT is installed here")
def test_only_unavailable_backends_fail(tiny_bundle, capsys):
    code, _, err = run([tiny_bundle, "--backends", "tensorrt", "--shape", "8,8,2", "--quiet"], capsys)
    assert code == 1 and "nothing could be benchmarked" in err


def test_format_table_lists_skipped_rows():
    row = {"model": "m", "backend": "onnxruntime", "precision": "fp32", "status": "ok", "median_ms": 10.0,
           "mean_ms": 10.5, "sd_ms": 0.7, "p95_ms": 12.0, "p99_ms": None, "gpu_median_ms": 3.25,
           "stages_median_ms": dict.fromkeys(STAGES, 2.0), "outside_inference_share": 0.8,
           "slices_per_s": 100.0, "size_bytes": 2_000_000, "params": 1234, "peak_rss_mb": 50.0}
    skipped = {"model": "m", "backend": "tensorrt", "precision": "int8", "status": "skipped", "reason": "no GPU"}
    table = format_table([row, skipped]).splitlines()
    assert "10.0" in table[2] and "80.0" in table[2] and "2.000" in table[2] and "1,234" in table[2]
    assert "10.5 ± 0.7" in table[2] and "12.0" in table[2] and "3.2" in table[2]          # mean ± SD, p95, gpu ms
    assert "gpu ms" in table[0] and "p99 ms" in table[0]
    assert "skipped: no GPU" in table[3]


def test_torch_checkpoint_is_timed_side_by_side(tiny_bundle, tmp_path, capsys):
    pytest.importorskip("torch", reason="the train extra (torch) is not installed")
    checkpoint = pytest.importorskip("regionkd.train.checkpoint", reason="regionkd.train.checkpoint not available")
    models = pytest.importorskip("regionkd.train.models", reason="regionkd.train.models not available")
    model = models.create_model("tinynet", num_classes=3)
    ckpt = {"arch": "tinynet", "role": "student", "num_classes": 3, "class_names": ["background", "liver", "tumour"],
            "task": "liver", "model_state": model.state_dict(),
            "preprocessing": {"window": [-60, 140], "input_size": [32, 32], "orientation": "RAS",
                              "slice_axis": "axial"}}
    path = checkpoint.save_checkpoint(tmp_path / "student.pt", ckpt)
    out = tmp_path / "bench.json"
    code, stdout, _ = run([tiny_bundle, "--shape", "24,24,4", "--precisions", "fp32", "--repeat", "2",
                           "--checkpoint", path, "--threads", "1", "--json", out, "--quiet"], capsys)
    assert code == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["backend"] for r in rows] == ["onnxruntime", "pytorch"]
    torch_row = rows[1]
    assert torch_row["status"] == "ok" and torch_row["slices"] == 4
    assert torch_row["params"] == sum(p.numel() for p in model.parameters())
    assert torch_row["size_bytes"] == sum(t.numel() * t.element_size() for t in model.state_dict().values())
    assert "tinynet (student)" in stdout


def test_percentiles_need_enough_runs_and_peaks_are_per_configuration(tiny_bundle, tmp_path, capsys):
    from regionkd.sdk.bench import peak_rss_mb, reset_peak_rss, tail

    assert tail(list(range(19)), 95) is None and tail(list(range(20)), 95) == pytest.approx(18.05)
    assert tail(list(range(99)), 99) is None and tail(list(range(100)), 99) is not None
    # a big allocation raises the peak; after a reset the peak is back near what the process holds now
    assert reset_peak_rss()
    base, scope = peak_rss_mb()
    block = np.ones(200_000_000 // 8)                 # 200 MB touched
    high, _ = peak_rss_mb()
    del block
    assert reset_peak_rss()
    after, _ = peak_rss_mb()
    assert scope == "configuration" and high > base + 150 and after < high - 150


def test_bench_times_a_dicom_series_folder_with_the_auto_backend(tiny_bundle, tmp_path, capsys):
    pytest.importorskip("pydicom", reason="the dicom extra (pydicom) is not installed")
    from tests.helpers import make_phantom

    from regionkd.sdk.dicom_write import write_ct_series

    hu, affine = make_phantom()
    write_ct_series(hu, affine, tmp_path / "series")
    out = tmp_path / "bench.json"
    code, stdout, _ = run([tiny_bundle, "--volume", tmp_path / "series", "--precisions", "fp32", "--repeat", "2",
                           "--json", out, "--quiet"], capsys)
    assert code == 0
    report = json.loads(out.read_text())
    assert report["volume"] == {"source": str(tmp_path / "series"), "kind": "dicom", "shape": [40, 36, 12]}
    (row,) = report["rows"]
    assert row["status"] == "ok" and row["slices"] == 12
    import shutil
    if shutil.which("nvidia-smi") is None:
        assert row["backend"] == "onnxruntime"        # what auto chooses without a GPU


def test_bench_times_the_fused_model_beside_the_numpy_path_and_a_folder(tiny_bundle, tmp_path, capsys):
    pytest.importorskip("onnx")
    import shutil

    from regionkd.export.fused import build_fused
    from regionkd.sdk.bundle import load_bundle

    bundle = tmp_path / "fused.bundle"
    shutil.copytree(tiny_bundle, bundle)
    prep = load_bundle(bundle).preprocessing
    build_fused(bundle / "model.fp32.onnx", bundle / "model.fp32.fused.onnx", prep["window"], prep["input_size"])
    load_bundle(bundle).register_file(bundle / "model.fp32.fused.onnx", format="onnx", precision="fp32",
                                      flavour="reference", graph="fused", backends=["onnxruntime"])
    out = tmp_path / "bench.json"
    code, stdout, _ = run([bundle, "--shape", "40,36,6", "--precisions", "fp32", "--repeat", "2", "--folder", "3",
                           "--json", out, "--quiet"], capsys)
    assert code == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["precision"], r["path"], r["model_file"]) for r in rows] == [
        ("fp32", "fused", "model.fp32.fused.onnx"), ("fp32", "numpy", "model.fp32.onnx")]
    for r in rows:
        assert set(r["folder"]) == {"sequential", "pipelined"}
        for f in r["folder"].values():
            assert f["volumes"] == 3 and f["volumes_per_min"] > 0 and 0 < f["outside_inference_share"] < 1
    assert "fused" in stdout and "folder onnxruntime fp32 fused pipelined: 3 volumes" in stdout
