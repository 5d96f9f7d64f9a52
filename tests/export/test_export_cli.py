"""`regionkd-export` end to end: a tiny TinyNet checkpoint trained for a few seconds on hand-made
phantoms written as a real LiTS-layout dataset (volume-N.nii / segmentation-N.nii), exported to a
bundle that the SDK loads and runs; TensorRT-RTX engines for fp32, fp16 and int8 when
tensorrt_rtx_bindings is installed (it builds on the CPU)."""
from __future__ import annotations

import importlib.util
import json

import nibabel as nib
import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("onnx")
data_mod = pytest.importorskip("regionkd.train.data")
if not hasattr(data_mod, "open_dataset"):
    pytest.skip("regionkd.train.data.open_dataset (the dataset readers) is not available yet", allow_module_level=True)

from tests.helpers import LIVER, TUMOUR, make_phantom, run_main  # noqa: E402

from regionkd.export.cli import main  # noqa: E402
from regionkd.export.pipeline import ExportOptions, export_bundle  # noqa: E402
from regionkd.sdk.bundle import load_bundle  # noqa: E402
from regionkd.sdk.preprocess import preprocess_slices, resize_labels_nearest, volume_to_slices  # noqa: E402

WINDOW = [-60.0, 140.0]
SIZE = [32, 32]
HAS_RTX = importlib.util.find_spec("tensorrt_rtx_bindings") is not None
GATE = 0.15   # the fixture's --max-dice-drop


def _labels(hu):
    return np.where(hu == TUMOUR, 2, np.where(hu == LIVER, 1, 0)).astype(np.uint8)


def _write_lits(root, shapes):
    root.mkdir(parents=True)
    for i, shape in enumerate(shapes):
        hu, affine = make_phantom(shape=shape, with_distractor=False)
        nib.save(nib.Nifti1Image(hu.astype(np.int16), affine), str(root / f"volume-{i}.nii"))
        nib.save(nib.Nifti1Image(_labels(hu), affine), str(root / f"segmentation-{i}.nii"))
    return root


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("ct")
    calib = _write_lits(d / "calib", [(40, 36, 12), (44, 40, 10), (36, 40, 12)])
    val = _write_lits(d / "val", [(40, 40, 14), (42, 38, 12)])
    return calib, val


@pytest.fixture(scope="module")
def checkpoint(data, tmp_path_factory):
    """TinyNet fitted for ~200 steps on the calibration phantoms (seconds on one core)."""
    from regionkd.train.checkpoint import save_checkpoint
    from regionkd.train.models import create_model

    torch.manual_seed(0)
    images, labels = [], []
    for i in range(3):
        vol = nib.load(str(data[0] / f"volume-{i}.nii"))
        hu = np.asarray(vol.dataobj, np.float32)  # phantoms are written in RAS order already
        images.append(preprocess_slices(volume_to_slices(hu), WINDOW, SIZE))
        labels.append(resize_labels_nearest(volume_to_slices(_labels(hu)), SIZE))
    x = torch.from_numpy(np.concatenate(images))
    y = torch.from_numpy(np.concatenate(labels).astype(np.int64))
    model = create_model("tinynet", num_classes=3)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    weights = torch.tensor([0.2, 1.0, 3.0])
    model.train()
    for _ in range(200):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), y, weight=weights)
        loss.backward()
        opt.step()
    path = tmp_path_factory.mktemp("ckpt") / "student.pt"
    save_checkpoint(path, {
        "arch": "tinynet", "role": "student", "num_classes": 3, "class_names": ["background", "liver", "tumour"],
        "task": "liver", "model_state": model.state_dict(),
        "preprocessing": {"window": WINDOW, "input_size": SIZE, "orientation": "RAS", "slice_axis": "axial",
                          "normalisation": {"type": "window-linear", "range": [-1, 1]}},
        "provenance": {"teacher": None, "kd": [], "alpha": 0.1, "beta1": 0.9, "beta2": 0.9, "temperature": 4.0,
                       "data": "test phantoms", "seed": 0, "package_version": "test", "date": "today"},
        "metrics": {}, "config": {}, "train_state": {}})
    return path


@pytest.fixture(scope="module")
def exported(data, checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("out") / "bundle"
    # A 30 k-parameter net on 32x32 slices: int8 moves a few of the validation tumour's pixels, which is
    # several % of its Dice (0.874 -> 0.781 for the uint8-activation flavour with numpy 2.4 / onnxruntime
    # 1.32); the gate itself is tested below with --max-dice-drop 0.
    main([str(checkpoint), "--out", str(out), "--precision", "fp32,fp16,int8", "--calib", str(data[0]),
          "--calib-slices", "24", "--val", str(data[1]), "--engine", "auto", "--max-batch", "4",
          "--max-dice-drop", str(GATE)])  # exits only on error
    return out


def test_bundle_loads_and_lists_every_precision(exported):
    bundle = load_bundle(exported)
    m = bundle.manifest
    names = {e["path"]: e for e in m["files"]}
    assert {"model.fp32.onnx", "model.fp16.onnx", "model.int8.onnx"} <= set(names)
    assert m["model"]["arch"] == "tinynet" and m["model"]["params"] > 1000
    assert m["preprocessing"]["window"] == WINDOW and m["preprocessing"]["input_size"] == SIZE
    assert m["preprocessing"]["largest_component_labels"] == [1]          # from the liver task, not guessed
    assert "largest_component_counts" not in m["preprocessing"]
    assert m["io"] == {"input": "image", "output": "logits", "max_batch": 4}
    assert names["model.int8.onnx"]["flavour"] == "tensorrt"
    # the onnxruntime INT8 file is whichever flavour measured faster here
    cpu_int8 = bundle.select_file("int8", "onnxruntime")
    assert cpu_int8["path"] in ("model.int8-cpu.onnx", "model.int8.onnx")
    assert m["provenance"]["checkpoint"]["sha256"] and m["provenance"]["kd"] == []
    assert m["calibration"]["slices"] == 24 and m["calibration"]["strata"]["lesion"] > 0
    assert (exported / "calibration.json").is_file()
    # smaller than fp32 even for a 30 k-param net, where per-channel scales and Q/DQ node names weigh
    # (the <= 30% bound for a net with weights that dominate is in test_export.py)
    assert names["model.int8.onnx"]["bytes"] < names["model.fp32.onnx"]["bytes"]


def test_metrics_parity_and_dice_within_the_gate(exported):
    manifest = json.loads((exported / "manifest.json").read_text())
    metrics, gate = manifest["metrics"], manifest["validation"]["max_dice_drop"]
    assert gate == GATE                                   # what the fixture asked for
    assert metrics["fp32"]["parity"]["max_abs_logit_diff"] < 1e-3
    assert metrics["fp32"]["parity"]["argmax_agreement"] > 0.999
    ref = metrics["fp32"]["dice"]
    assert ref["liver"] > 0.8, "the tiny model should have learnt the phantom's liver"
    for p in ("fp16", "int8"):
        for cls, d in metrics[p]["dice"].items():
            if ref[cls] is not None:
                assert ref[cls] - d <= gate + 1e-9, (p, cls, ref[cls], d)
        assert metrics[p]["cpu_latency_ms"]["median_ms"] > 0


def test_bundle_runs_in_the_sdk_onnxruntime_backend(exported):
    from regionkd.sdk.backends import create_backend

    bundle = load_bundle(exported)
    x = np.zeros((2, 1, *SIZE), np.float32)
    hu = np.full((2, 1, 45, 37), -1000.0, np.float32)          # a fused model takes any matrix
    for precision in ("fp32", "fp16", "int8"):
        backend = create_backend("onnxruntime", bundle, precision, fused=False)
        fused = create_backend("onnxruntime", bundle, precision)
        try:
            assert backend.run(x).shape == (2, 3, *SIZE)
            labels = fused.run(hu)
            assert labels.shape == (2, 45, 37) and labels.dtype == np.uint8
        finally:
            backend.close()
            fused.close()


@pytest.mark.skipif(not HAS_RTX, reason="tensorrt_rtx_bindings is not installed (pip install 'regionkd[tensorrt-rtx]')")
def test_tensorrt_rtx_engines_built_for_every_precision(exported):
    bundle = load_bundle(exported)
    engines = [e for e in bundle.files if e.get("format") == "tensorrt-rtx-engine"]
    assert sorted(e["precision"] for e in engines) == ["fp16", "fp32", "int8"]
    by_precision = {e["precision"]: e for e in engines}
    assert by_precision["int8"]["source"] == "model.int8.onnx"
    for e in engines:
        assert e["path"].startswith("engines/rtx") and e["backends"] == ["tensorrt-rtx"]
        assert e["bytes"] > 0 and e["max_batch"] == 4


def test_a_fresh_bundle_names_the_organ_components_of_its_task(checkpoint, tmp_path):
    """The manifest tells the runtime which organ labels keep only their largest component(s) and how
    many (two kidneys), from the checkpoint's task, so no runtime has to guess from class names."""
    from regionkd.train.checkpoint import load_checkpoint, save_checkpoint

    ckpt = load_checkpoint(checkpoint)
    ckpt.update(task="kidney", class_names=["background", "kidney", "tumour"])
    path = tmp_path / "kidney.pt"
    save_checkpoint(path, ckpt)
    main([str(path), "--out", str(tmp_path / "kidney.bundle"), "--precision", "fp32", "--engine", "never", "--quiet"])
    prep = load_bundle(tmp_path / "kidney.bundle").preprocessing
    assert prep["largest_component_labels"] == [1] and prep["largest_component_counts"] == {"1": 2}


def test_interrupted_export_leaves_no_half_bundle(data, checkpoint, tmp_path):
    out = tmp_path / "bundle"

    def stop_at_quantization(step, done, total):
        if step.startswith("quantize int8"):
            raise KeyboardInterrupt

    opts = ExportOptions(checkpoint=checkpoint, out=out, precisions=("fp32", "fp16", "int8"), calib=data[0],
                         calib_slices=8, engine="never")
    with pytest.raises(KeyboardInterrupt):
        export_bundle(opts, progress=stop_at_quantization)
    assert list(tmp_path.iterdir()) == []


def test_progress_counts_the_steps_the_options_want(data, checkpoint, tmp_path):
    """The progress callback sees each step of export_steps(opts) start, in order, out of their count."""
    from regionkd.export.pipeline import export_steps

    calls = []
    opts = ExportOptions(checkpoint=checkpoint, out=tmp_path / "b", precisions=("fp32",), val=data[1], engine="never")
    names = [step.name for step in export_steps(opts)]
    assert names == ["load checkpoint", "read CT slices", "export fp32 ONNX", "measure CPU latency",
                     "build fused models", "validate (Dice)", "write manifest"]
    export_bundle(opts, progress=lambda *call: calls.append(call))
    total = len(names)
    assert calls == [(name, i, total) for i, name in enumerate(names)] + [("done", total, total)]


def test_int8_without_calibration_data_is_refused(checkpoint, data, tmp_path, capsys):
    with pytest.raises(SystemExit) as err:
        main([str(checkpoint), "--out", str(tmp_path / "b"), "--precision", "int8", "--val", str(data[1]),
              "--engine", "never", "--quiet"])
    assert err.value.code == 1
    assert "--calib" in capsys.readouterr().err
    assert not (tmp_path / "b").exists()


def test_max_dice_drop_zero_refuses_any_loss_and_writes_nothing(exported, data, checkpoint, tmp_path, capsys):
    """The same export with --max-dice-drop 0: refused exactly when a shipped fp16/int8 file lost Dice
    on some class in the accepted run above (the export is deterministic), with the class in the message."""
    manifest = json.loads((exported / "manifest.json").read_text())
    metrics, gate = manifest["metrics"], manifest["validation"]["max_dice_drop"]
    assert gate == GATE                                   # what the fixture asked for
    ref = metrics["fp32"]["dice"]
    shipped = [metrics["fp16"], metrics["int8"]] + list((metrics["int8"].get("flavours") or {}).values())
    losers = sorted({cls for m in shipped for cls, d in m["dice"].items() if ref[cls] is not None and d < ref[cls]})
    out = tmp_path / "strict"
    args = [str(checkpoint), "--out", str(out), "--calib", str(data[0]), "--calib-slices", "24",
            "--val", str(data[1]), "--engine", "never", "--max-dice-drop", "0", "--quiet"]
    if not losers:
        main(args)
        assert out.is_dir()
        return
    with pytest.raises(SystemExit) as err:
        main(args)
    assert err.value.code == 1
    msg = capsys.readouterr().err
    assert "--max-dice-drop 0" in msg and any(f"'{cls}'" in msg for cls in losers)
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_export_signs_with_sign_key_and_records_the_training_spacing(data, checkpoint, tmp_path, capsys):
    from tests.helpers import run_main

    from regionkd.sdk.signing import generate_keypair
    from regionkd.train.checkpoint import load_checkpoint, save_checkpoint

    key, pub, key_id = generate_keypair(tmp_path / "vendor")
    ckpt = load_checkpoint(checkpoint)
    ckpt["preprocessing"]["spacing"] = {"in_plane_mm": [0.8, 0.9], "slice_thickness_mm": [2.5, 2.5]}
    with_spacing = tmp_path / "spaced.pt"
    save_checkpoint(with_spacing, ckpt)
    out = tmp_path / "signed.bundle"
    args = [with_spacing, "--out", out, "--precision", "fp32", "--val", data[1], "--engine", "never"]
    code, stdout, _ = run_main(main, args + ["--sign-key", key], capsys)
    assert code == 0 and f"(signed, key {key_id})" in stdout
    bundle = load_bundle(out, trusted_keys=[pub])
    assert bundle.signature.verified and bundle.signature.key_id == key_id
    assert bundle.preprocessing["spacing"] == {"in_plane_mm": [0.8, 0.9], "slice_thickness_mm": [2.5, 2.5]}
    # a key that is not a private key stops the export before any work, leaving nothing
    code, _, err = run_main(main, args[:2] + [tmp_path / "never.bundle"] + args[3:] + ["--sign-key", pub], capsys)
    assert code == 1 and "not a PEM private key" in err and not (tmp_path / "never.bundle").exists()


# ---------------------------------------------------------------- defaults that work, metadata, names only

def test_the_defaults_work_without_any_data(checkpoint, tmp_path, capsys):
    """`regionkd-export CKPT --out DIR`: fp32 + fp16 (no int8 without --calib), parity on a synthetic CT."""
    from tests.helpers import run_main

    out = tmp_path / "plain.bundle"
    code, stdout, err = run_main(main, [checkpoint, "--out", out], capsys)
    assert code == 0, err
    bundle = load_bundle(out)
    assert bundle.precisions == ["fp32", "fp16"]
    m = bundle.manifest
    assert m["metrics"]["fp32"]["parity_data"] == "synthetic"
    assert m["metrics"]["fp32"]["parity"]["max_abs_logit_diff"] < 1e-3
    assert "synthetic CT" in stdout + err and "metadata" not in m


def test_int8_without_calib_is_refused_before_any_work_or_progress_bar(checkpoint, tmp_path, capsys):
    from tests.helpers import run_main

    code, stdout, err = run_main(main, [checkpoint, "-o", tmp_path / "b", "--precisions", "fp32,int8"], capsys)
    assert code == 1 and "--calib" in err
    assert "steps" not in err and "load checkpoint" not in err      # no bar was drawn
    assert not (tmp_path / "b").exists()
    code, _, err = run_main(main, [tmp_path / "missing.pt", "-o", tmp_path / "b"], capsys)
    assert code == 1 and "missing.pt" in err and "steps" not in err


def test_metadata_fields_and_provenance_without_absolute_paths(data, checkpoint, tmp_path, capsys):
    from tests.helpers import run_main

    from regionkd.train.checkpoint import load_checkpoint, save_checkpoint

    ckpt = load_checkpoint(checkpoint)       # provenance as the trainer writes it: absolute paths
    ckpt["provenance"].update(data=str(tmp_path / "secret" / "lits"), unlabelled=str(tmp_path / "secret" / "more"),
                              teacher={"path": str(tmp_path / "secret" / "teacher.pt"), "sha256": "ab" * 32,
                                       "arch": "unet"})
    path = tmp_path / "student-kd.pt"
    save_checkpoint(path, ckpt)
    out = tmp_path / "meta.bundle"
    code, _, err = run_main(main, [path, "--out", out, "--precision", "fp32", "--val", data[1], "--engine", "never",
                                   "--model-version", "1.4.2", "--description", "liver and liver tumours on CT",
                                   "--authors", "Imaging Team", "--license", "Apache-2.0",
                                   "--intended-use", "research use only", "--reference", "doi:10.1109/TMI.2021.3098703",
                                   "--copyright", "(c) 2026 Imaging Team", "--quiet"], capsys)
    assert code == 0, err
    m = load_bundle(out).manifest
    assert m["metadata"] == {"version": "1.4.2", "description": "liver and liver tumours on CT",
                             "authors": "Imaging Team", "license": "Apache-2.0", "intended_use": "research use only",
                             "references": ["doi:10.1109/TMI.2021.3098703"], "copyright": "(c) 2026 Imaging Team"}
    text = (out / "manifest.json").read_text()
    assert str(tmp_path) not in text and "/secret/" not in text
    prov = m["provenance"]
    assert prov["checkpoint"] == {"name": "student-kd.pt", "sha256": prov["checkpoint"]["sha256"]}
    assert prov["teacher"] == {"name": "teacher.pt", "sha256": "ab" * 32, "arch": "unet"}
    assert prov["data"] == "lits" and prov["unlabelled"] == "more" and m["validation"]["data"] == data[1].name


def test_fused_models_ship_agree_with_the_numpy_path_and_are_the_default(exported, data):
    """Every shipped precision has a fused twin (raw HU in, uint8 labels out) whose labels agree with
    the numpy path on >= 99.99 % of each validation volume's voxels (recorded in the manifest), and
    the Segmenter runs it unless told not to."""
    from regionkd.sdk.segmenter import Segmenter

    bundle = load_bundle(exported)
    fused = {e["path"]: e for e in bundle.files if e.get("graph") == "fused"}
    assert {"model.fp32.fused.onnx", "model.fp16.fused.onnx", "model.int8.fused.onnx"} <= set(fused)
    for entry in fused.values():
        assert len(entry["label_agreement"]) == 2 and min(entry["label_agreement"]) >= 0.9999, entry
    cases = sorted(data[1].glob("volume-*.nii"))
    for precision in ("fp32", "int8"):
        with Segmenter(bundle, backend="onnxruntime", precision=precision) as default, \
                Segmenter(bundle, backend="onnxruntime", precision=precision, fused=False) as numpy_path:
            assert default.backend.fused and not numpy_path.backend.fused
            assert default.backend.model_path.name.endswith(".fused.onnx")
            for case in cases:
                a = np.asarray(default.segment(nib.load(str(case))).mask.dataobj)
                b = np.asarray(numpy_path.segment(nib.load(str(case))).mask.dataobj)
                assert np.mean(a == b) >= 0.9999, (precision, case.name)


def test_manifest_dice_and_evaluate_agree_with_the_masks_regionkd_segment_writes(checkpoint, tmp_path, capsys):
    """The Dice a bundle's manifest reports, and the Dice `regionkd-train evaluate` reports for the
    checkpoint, are the Dice of the masks `regionkd-segment` writes on the same cases. The cases hold
    a liver-density blob away from the liver, so a Dice measured without the runtime's
    largest-component step would differ."""
    from regionkd.sdk.cli_segment import main as segment_main
    from regionkd.train.data import open_dataset
    from regionkd.train.evaluate import evaluate_checkpoint
    from regionkd.train.metrics import DiceAccumulator, case_metrics

    val = tmp_path / "val"
    val.mkdir()
    for i, shape in enumerate([(40, 40, 14), (42, 38, 12)]):
        hu, affine = make_phantom(shape=shape, with_distractor=True)
        truth, _ = make_phantom(shape=shape, with_distractor=False)
        nib.save(nib.Nifti1Image(hu.astype(np.int16), affine), str(val / f"volume-{i}.nii"))
        nib.save(nib.Nifti1Image(_labels(truth), affine), str(val / f"segmentation-{i}.nii"))
    bundle = tmp_path / "bundle"
    main([str(checkpoint), "--out", str(bundle), "--precision", "fp32", "--val", str(val), "--engine", "never",
          "--quiet"])
    cases = sorted(val.glob("volume-*.nii"))
    code, _, err = run_main(segment_main, [bundle, *cases, "-o", tmp_path / "masks", "--backend", "onnxruntime",
                                           "--precision", "fp32", "-q"], capsys)
    assert code == 0, err
    pooled, pooled_raw, per_case = DiceAccumulator(3), DiceAccumulator(3), {}
    with_blob = 0
    for case in cases:
        mask = np.asarray(nib.load(str(tmp_path / "masks" / case.name)).dataobj)
        ref = np.asarray(nib.load(str(case.with_name(case.name.replace("volume", "segmentation")))).dataobj)
        pooled.add(mask, ref)
        per_case[case.name] = case_metrics(mask, ref, (1, 1, 1), [1, 2], surface=False)
        raw = np.asarray(nib.load(str(case)).dataobj)
        with_blob += int(((raw == LIVER) & (ref == 0)).sum())
    assert with_blob > 0                                  # the blob is there to be removed
    manifest_dice = load_bundle(bundle).manifest["metrics"]["fp32"]["dice"]
    assert manifest_dice == pooled.dice(["background", "liver", "tumour"])          # exactly: the same masks
    ds = open_dataset(val)
    evaluated = evaluate_checkpoint(checkpoint, val, case_ids=list(ds.case_ids), metrics=("dice",))
    for cid, case in zip(sorted(ds.case_ids), cases):
        for label, name in ((1, "liver"), (2, "tumour")):
            # PyTorch eager vs the ONNX export: the same pipeline, floating-point differences only
            assert abs(evaluated["cases"][cid][name]["dice"] - per_case[case.name][label]["dice"]) < 2e-3, (cid, name)
