"""Bundle manifest schema, checksum verification and file selection (regionkd.sdk.bundle)."""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from regionkd.sdk.bundle import (FORMAT_VERSION, file_entry, load_bundle, read_manifest, sha256_file,
                                 write_manifest)
from regionkd.sdk.errors import BundleError


@pytest.fixture
def bundle_copy(tiny_bundle, tmp_path):
    dst = tmp_path / "copy.bundle"
    shutil.copytree(tiny_bundle, dst)
    return dst


def _edit_manifest(root, edit):
    manifest = json.loads((root / "manifest.json").read_text())
    edit(manifest)
    (root / "manifest.json").write_text(json.dumps(manifest))


def test_sha256_file_matches_known_digest(tmp_path):
    p = tmp_path / "abc.bin"
    p.write_bytes(b"abc")
    assert sha256_file(p) == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"


def test_load_bundle_reads_manifest_and_files(tiny_bundle):
    b = load_bundle(tiny_bundle)
    assert b.class_names == ["background", "liver", "tumour"]
    assert b.preprocessing["window"] == [-60, 140]
    assert b.precisions == ["fp32", "fp16", "int8"]
    assert b.params == 6 and b.max_batch == 4
    for entry in b.files:
        data = b.path_of(entry).read_bytes()
        assert entry["sha256"] == hashlib.sha256(data).hexdigest()
        assert entry["bytes"] == len(data)


def test_select_file_picks_the_flavour_for_the_backend(tiny_bundle):
    b = load_bundle(tiny_bundle)
    assert b.select_file("fp32", "onnxruntime")["path"] == "model.fp32.onnx"
    assert b.select_file("fp16", "onnxruntime")["path"] == "model.fp16.onnx"
    assert b.select_file("int8", "onnxruntime")["path"] == "model.int8-cpu.onnx"
    assert b.select_file("int8", "tensorrt")["path"] == "model.int8.onnx"
    assert b.select_file("int8", "onnxruntime", flavour="cpu")["flavour"] == "cpu"
    with pytest.raises(BundleError, match="tensorrt-rtx") as err:
        b.select_file("fp16", "tensorrt-rtx")
    assert "model.fp16.onnx" in str(err.value)  # lists what the bundle has


def test_missing_file_is_named(bundle_copy):
    (bundle_copy / "model.fp16.onnx").unlink()
    with pytest.raises(BundleError, match=r"model\.fp16\.onnx.*missing"):
        load_bundle(bundle_copy)


def test_wrong_checksum_same_size_is_refused(bundle_copy):
    path = bundle_copy / "model.fp32.onnx"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(BundleError, match=r"model\.fp32\.onnx.*wrong checksum"):
        load_bundle(bundle_copy)


def test_truncated_file_is_refused(bundle_copy):
    path = bundle_copy / "model.int8-cpu.onnx"
    path.write_bytes(path.read_bytes()[:50])
    with pytest.raises(BundleError, match=r"model\.int8-cpu\.onnx has 50 bytes"):
        load_bundle(bundle_copy)


def test_unknown_format_version_is_refused(bundle_copy):
    _edit_manifest(bundle_copy, lambda m: m.update(format_version=2))
    with pytest.raises(BundleError, match="unknown format_version 2"):
        load_bundle(bundle_copy)


@pytest.mark.parametrize("edit, message", [
    (lambda m: m.pop("files"), "'files'"),
    (lambda m: m["preprocessing"].update(window=[100, 0]), "window"),
    (lambda m: m["preprocessing"].update(input_size=[32]), "input_size"),
    (lambda m: m["model"].update(num_classes=4), "num_classes"),
    (lambda m: m["files"][0].update(path="../evil.onnx"), "inside the bundle"),
    (lambda m: m["files"][0].update(precision="fp8"), "unknown precision"),
    (lambda m: m["files"][0].pop("sha256"), "no 'sha256'"),
])
def test_malformed_manifest_is_refused(bundle_copy, edit, message):
    _edit_manifest(bundle_copy, edit)
    with pytest.raises(BundleError, match=message):
        load_bundle(bundle_copy)


def test_not_json_and_no_manifest(bundle_copy, tmp_path):
    (bundle_copy / "manifest.json").write_text("{not json")
    with pytest.raises(BundleError, match="not valid JSON"):
        load_bundle(bundle_copy)
    (bundle_copy / "manifest.json").unlink()
    with pytest.raises(BundleError, match="no manifest.json"):
        load_bundle(bundle_copy)
    with pytest.raises(BundleError, match="does not exist"):
        load_bundle(tmp_path / "nowhere")


def test_register_file_adds_entry_and_rewrites_manifest(bundle_copy):
    b = load_bundle(bundle_copy)
    (bundle_copy / "engines").mkdir()
    engine = bundle_copy / "engines" / "rtx1.7.1-fp16.engine"
    engine.write_bytes(b"\x00engine-bytes")
    entry = b.register_file(engine, format="tensorrt-rtx-engine", precision="fp16", backends=["tensorrt-rtx"],
                            trt_version="1.7.1", compute_capability=None, source="model.fp16.onnx")
    assert entry["path"] == "engines/rtx1.7.1-fp16.engine"
    assert entry["bytes"] == 13 and entry["sha256"] == hashlib.sha256(b"\x00engine-bytes").hexdigest()
    reloaded = load_bundle(bundle_copy)
    assert reloaded.select_file("fp16", "tensorrt-rtx", trt_version="1.7.1")["path"] == entry["path"]
    # replacing by path keeps one entry
    engine.write_bytes(b"other")
    reloaded.register_file(engine, format="tensorrt-rtx-engine", precision="fp16", backends=["tensorrt-rtx"])
    assert [e["path"] for e in read_manifest(bundle_copy)["files"]].count(entry["path"]) == 1
    assert not [p for p in bundle_copy.iterdir() if p.name.startswith(".")]  # no temp files left


def test_file_entry_refuses_paths_outside_and_write_manifest_validates(tmp_path):
    root = tmp_path / "b"
    root.mkdir()
    outside = tmp_path / "x.onnx"
    outside.write_bytes(b"x")
    with pytest.raises(BundleError, match="not inside"):
        file_entry(outside, root)
    with pytest.raises(BundleError, match="format_version"):
        write_manifest(root, {"format_version": FORMAT_VERSION + 1})
    assert not (root / "manifest.json").exists()


def test_file_entry_with_a_relative_bundle_directory(tmp_path, monkeypatch):
    # regression: `regionkd-export --out work/demo/x.bundle` gave work/demo/x.bundle/work/demo/x.bundle/...
    monkeypatch.chdir(tmp_path)
    root = Path("work") / "demo.bundle"
    root.mkdir(parents=True)
    (root / "model.fp32.onnx").write_bytes(b"onnx")
    entry = file_entry(root / "model.fp32.onnx", root, precision="fp32")
    assert entry["path"] == "model.fp32.onnx" and entry["bytes"] == 4
