"""benchmarks/gpu_check.sh: the one-shot GPU check, run here as its --dry-run (the same code on the
CPU at tiny sizes) through the bash wrapper, with the JSON and Markdown it writes checked; and the
wrapper's offline wheel step (benchmarks/_gpu_wheels.py) on hand-made wheels."""
from __future__ import annotations

import base64
import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BENCH = REPO / "benchmarks"
import _gpu_wheels as W  # noqa: E402  (benchmarks/ is on pytest's pythonpath: setup.cfg)

SECTIONS = ("environment", "pytorch_latency", "distillation", "sdk_torch", "tensorrt_rtx")


# ----------------------------------------------------------------------------- the wheel step

def make_wheel(folder: Path, name: str, version: str, module: str) -> Path:
    """A minimal pure-Python wheel holding `module`.py (what pip needs: METADATA, WHEEL, RECORD)."""
    dist = f"{name.replace('-', '_')}-{version}"
    files = {f"{module}.py": f"VALUE = {version!r}\n",
             f"{dist}.dist-info/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
             f"{dist}.dist-info/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    record = []
    for path, text in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=").decode()
        record.append(f"{path},sha256={digest},{len(text.encode())}")
    record.append(f"{dist}.dist-info/RECORD,,")
    files[f"{dist}.dist-info/RECORD"] = "\n".join(record) + "\n"
    wheel = folder / f"{dist}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        for path, text in files.items():
            z.writestr(path, text)
    return wheel


def test_wheel_plan_skips_present_and_picks_one_rtx_flavour(tmp_path):
    names = ["nibabel-5.4.2-py3-none-any.whl", "numpy-2.4.6-cp312-cp312-manylinux_2_28_x86_64.whl",
             "tensorrt_rtx_cu12_libs-1.7.1.116-py2.py3-none-manylinux_2_28_x86_64.whl",
             "tensorrt_rtx_cu12_bindings-1.7.1.116-cp312-none-manylinux_2_28_x86_64.whl",
             "tensorrt_rtx_cu13_libs-1.7.1.116-py2.py3-none-manylinux_2_28_x86_64.whl",
             "tensorrt_rtx_cu13_bindings-1.7.1.116-cp312-none-manylinux_2_28_x86_64.whl", "notawheel.whl"]
    wheels = [tmp_path / n for n in names]
    have = {"numpy": "2.1.0"}.get
    p = W.plan(wheels, have=have, cuda_major=12)
    assert sorted(w.name for w in p["install"]) == sorted(names[i] for i in (0, 2, 3))
    assert p["present"] == {"numpy": "2.1.0"}                # torch's numpy is kept, whatever its version
    assert "cu12 taken" in p["skipped"][names[4]] and "not a wheel" in p["skipped"]["notawheel.whl"]
    p = W.plan(wheels, have=have, cuda_major=13)
    assert {w.name for w in p["install"]} >= {names[4], names[5]} and names[2] in p["skipped"]
    p = W.plan(wheels, have=have, cuda_major=None)          # no driver seen: the newest flavour
    assert names[5] in {w.name for w in p["install"]}


def test_wheel_step_installs_offline_only_what_is_missing(tmp_path):
    wheels, site = tmp_path / "wheels", tmp_path / "site"
    wheels.mkdir()
    make_wheel(wheels, "regionkd-gpu-check-dummy", "1.0", "rkd_gpu_check_dummy")
    make_wheel(wheels, "click", "0.1", "click_impostor")     # click is installed here: left alone
    report = tmp_path / "wheels.json"
    assert W.main([str(wheels), str(site), str(report)]) == 0
    r = json.loads(report.read_text())
    assert r["installed"] == ["regionkd_gpu_check_dummy-1.0-py3-none-any.whl"] and r["failed"] == {}
    assert "click" in r["present"] and (site / "rkd_gpu_check_dummy.py").is_file()
    assert not (site / "click_impostor.py").exists()
    assert W.main([str(wheels), str(site), str(report)]) == 0   # same wheels: the folder is reused
    assert json.loads(report.read_text())["reused"] is True
    empty = tmp_path / "none"
    empty.mkdir()
    assert W.main([str(empty), str(tmp_path / "site2"), str(report)]) == 0
    assert json.loads(report.read_text())["wheels_found"] == 0 and not (tmp_path / "site2").exists()


# ----------------------------------------------------------------------------- the dry run

@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("torch") is None, reason="needs torch (the training extra)")
@pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None, reason="needs bash and timeout")
def test_gpu_check_dry_run_through_the_wrapper(tmp_path):
    out, wheels = tmp_path / "out", tmp_path / "no-wheels"
    wheels.mkdir()
    env = dict(os.environ, PYTHON=sys.executable, GPU_CHECK_WHEELS=str(wheels), GPU_CHECK_SITE=str(tmp_path / "site"),
               OMP_NUM_THREADS="1")
    r = subprocess.run(["bash", str(BENCH / "gpu_check.sh"), str(out), "--dry-run"], env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads((out / "gpu_check.json").read_text())
    assert result["format"] == "regionkd-gpu-check/1" and result["dry_run"] is True
    sec = result["sections"]
    assert tuple(sec) == SECTIONS
    for name in SECTIONS:      # every section can run on the CPU
        assert sec[name]["status"] == "ok", (name, sec[name].get("error"), sec[name].get("traceback"))
    assert json.loads((out / "wheels.json").read_text())["wheels_found"] == 0   # install step skipped

    env_ = sec["environment"]
    assert env_["modules"]["torch"]["imports"] and env_["modules"]["nibabel"]["imports"]
    assert "cuda" in env_ and env_["info"]["regionkd"]["sdk_from"]

    rows = sec["pytorch_latency"]["rows"]
    timed = {(r["arch"], r["mode"], r["precision"]): r for r in rows if "volume_ms" in r}
    for arch in ("raunet", "enet", "mobilenetv2"):
        row = timed[(arch, "eager", "fp32")]
        assert row["volume_ms"]["median"] > 0 and row["network_ms"]["median"] > 0 and row["slices"] == 8
    assert timed[("enet", "eager", "bf16")]["volume_ms"]["median"] > 0           # autocast, on the CPU
    assert timed[("enet", "compile", "fp32")]["setup_s"] > 0                     # torch.compile (eager backend)
    assert all("CUDA" in r["skipped"] for r in rows if r["mode"] == "cuda-graph")

    d = sec["distillation"]
    assert d["teacher"]["arch"] == "raunet" and d["student"]["arch"] == "enet"
    assert "--kd pmd,imd,rad" in d["setting"]["kd"]
    for role in ("teacher", "student"):
        assert 1 <= d[role]["steps"] <= 3 and d[role]["step_s"] > 0
        dice = d[role]["test"]["dice"]
        assert set(dice) == {"liver", "tumour"}                                  # a Dice per class
        assert isinstance(dice["liver"], float) and 0.0 <= dice["liver"] <= 1.0
    assert d["dice"]["student"] == d["student"]["test"]["dice"]

    sdk = {r["arch"]: r for r in sec["sdk_torch"]["rows"]}
    for arch in ("raunet", "enet", "mobilenetv2"):
        assert sdk[arch]["latency_ms"]["median"] > 0 and set(sdk[arch]["breakdown_ms"]) >= {"inference", "write"}
    assert sdk["enet"]["weights"] == "trained in the distillation section"

    rtx = sec["tensorrt_rtx"]
    assert rtx["export"]["trained"] is True and rtx["export"]["seconds"] > 0
    assert rtx["engines_load_on_this_gpu"] is None and rtx["engines_why_not"]        # no GPU here, and why
    if rtx["module"]["imports"]:
        assert {e["precision"] for e in rtx["engines_built"]} == {"fp32", "fp16"}    # built ahead of time on the CPU
    by_backend = {(r["backend"], r["precision"]): r for r in rtx["rows"]}
    assert by_backend[("onnxruntime", "fp32")]["latency_ms"]["median"] > 0
    assert "cannot run here" in by_backend[("tensorrt-rtx", "fp16")]["skipped"]

    md = (out / "gpu_check.md").read_text()
    for heading in ("## Environment", "## PyTorch per-volume latency", "## Distillation", "## SDK per-volume time",
                    "## TensorRT-RTX"):
        assert heading in md
    assert "engines load on this GPU" in md and (out / "logs" / "distillation.log").is_file()
