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
    (lambda m: m["files"][0].update(precision="fp8"), r"files\[0\]\.precision: 'fp8' is not one of"),
    (lambda m: m["files"][0].pop("sha256"), r"files\[0\]: 'sha256' is a required property"),
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


# ---------------------------------------------------------------- the whole schema, before any load

def _set(section, key, value):
    return lambda m: m[section].__setitem__(key, value)


HOSTILE_EDITS = {
    # every field the SDK uses, with a type or range it must refuse
    "max_batch -1": (_set("io", "max_batch", -1), r"io\.max_batch: -1 is less than the minimum of 1"),
    "max_batch 0": (_set("io", "max_batch", 0), r"io\.max_batch"),
    "max_batch 2.5": (_set("io", "max_batch", 2.5), r"io\.max_batch: 2\.5 is not of type 'integer'"),
    "max_batch true": (_set("io", "max_batch", True), r"io\.max_batch: True is not of type 'integer'"),
    "input_size huge": (_set("preprocessing", "input_size", [100000, 100000]),
                        r"preprocessing\.input_size\[\d\]: 100000 is greater than the maximum of 2048"),
    "input_size not /32": (_set("preprocessing", "input_size", [48, 32]), r"input_size\[0\]: 48 is not a multiple of 32"),
    "input_size zero": (_set("preprocessing", "input_size", [0, 32]), r"input_size\[0\]"),
    "input_size float": (_set("preprocessing", "input_size", [32.0, 32]), r"input_size\[0\]: 32\.0 is not of type 'integer'"),
    "largest_component name": (_set("preprocessing", "largest_component_labels", ["liver"]),
                               r"largest_component_labels\[0\]: 'liver' is not of type 'integer'"),
    "largest_component out of range": (_set("preprocessing", "largest_component_labels", [7]),
                                       r"label 7 is not a class \(the model has 3"),
    "largest_component background": (_set("preprocessing", "largest_component_labels", [0]), r"less than the minimum of 1"),
    "format_version true": (lambda m: m.update(format_version=True), r"format_version must be the integer 1, got true"),
    "format_version 1.0": (lambda m: m.update(format_version=1.0), r"format_version must be the integer 1, got 1\.0"),
    "format_version '1'": (lambda m: m.update(format_version="1"), r"format_version must be the integer 1, got \"1\""),
    "window lo == hi": (_set("preprocessing", "window", [140, 140]), r"window: must be \[lo, hi\] with lo < hi"),
    "window one value": (_set("preprocessing", "window", [140]), r"window: \[140\] is too short"),
    "window huge": (_set("preprocessing", "window", [-60, 1e300]), r"window\[1\]: 1e\+300 is greater than the maximum"),
    "window string": (_set("preprocessing", "window", ["-60", 140]), r"window\[0\]: '-60' is not of type 'number'"),
    "duplicate class names": (lambda m: m["model"].update(class_names=["bg", "liver", "liver"]), r"class_names: .* non-unique"),
    "one class": (lambda m: m["model"].update(class_names=["bg"], num_classes=1), r"model\.(class_names|num_classes)"),
    "class name not a string": (lambda m: m["model"].update(class_names=["bg", 1, "t"]), r"class_names\[1\]: 1 is not of type 'string'"),
    "bytes negative": (lambda m: m["files"][0].update(bytes=-5), r"files\[0\]\.bytes: -5 is less than the minimum of 0"),
    "bytes missing": (lambda m: m["files"][0].pop("bytes"), r"files\[0\]: 'bytes' is a required property"),
    "sha256 short": (lambda m: m["files"][0].update(sha256="abc"), r"files\[0\]\.sha256: 'abc' does not match"),
    "sha256 not hex": (lambda m: m["files"][0].update(sha256="g" * 64), r"files\[0\]\.sha256: 'g+' does not match"),
    "unknown backend": (lambda m: m["files"][0].update(backends=["openvino"]), r"files\[0\]\.backends\[0\]: 'openvino' is not one of"),
    "path absolute": (lambda m: m["files"][0].update(path="/etc/passwd"), r"files\[0\]\.path: '/etc/passwd' is absolute"),
    "path with dot parts": (lambda m: m["files"][0].update(path="./a/../model.fp32.onnx"), r"'\.' or '\.\.' part"),
    "path is the manifest": (lambda m: m["files"][0].update(path="manifest.json"), r"names the manifest"),
    "path listed twice": (lambda m: m["files"].append(dict(m["files"][0])), r"listed twice"),
    "normalisation range": (_set("preprocessing", "normalisation", {"type": "window-linear", "range": [0, 1]}),
                            r"preprocessing\.normalisation\.range: \[-1, 1\] was expected"),
    "orientation": (_set("preprocessing", "orientation", "LPS"), r"preprocessing\.orientation: 'RAS' was expected"),
    "top level list": (lambda m: None, None),   # replaced below
}


@pytest.mark.parametrize("case", sorted(HOSTILE_EDITS))
def test_hostile_manifests_are_refused_before_anything_loads(bundle_copy, case, monkeypatch):
    edit, message = HOSTILE_EDITS[case]
    if case == "top level list":
        (bundle_copy / "manifest.json").write_text("[1, 2, 3]")
        message = "top level must be a JSON object"
    else:
        _edit_manifest(bundle_copy, edit)
    import onnxruntime
    loaded = []
    monkeypatch.setattr(onnxruntime, "InferenceSession", lambda *a, **k: loaded.append(a))
    from regionkd.sdk.segmenter import Segmenter
    with pytest.raises(BundleError, match=message) as err:
        Segmenter(bundle_copy, backend="onnxruntime")
    assert "manifest.json" in str(err.value) and loaded == []


@pytest.mark.parametrize("text, message", [
    ('{"format_version": 1, "x": NaN}', "NaN is not a JSON number"),
    ('{"format_version": 1, "x": Infinity}', "Infinity is not a JSON number"),
    ('{"format_version": 1, "x": ' + "[" * 100 + "]" * 100 + "}", "nested deeper than 32 levels"),
    ('{"format_version": 1, "x": ' + "[" * 100000 + "]" * 100000 + "}", "nested deeper than 32 levels"),
])
def test_non_json_numbers_and_deep_nesting_are_refused(bundle_copy, text, message):
    (bundle_copy / "manifest.json").write_text(text)
    with pytest.raises(BundleError, match=message):
        load_bundle(bundle_copy)


def test_oversized_manifest_is_refused_without_parsing(bundle_copy):
    _edit_manifest(bundle_copy, lambda m: m.update(padding="x" * (1 << 20)))
    with pytest.raises(BundleError, match=r"manifest\.json: malformed manifest: larger than 1048576 bytes"):
        load_bundle(bundle_copy)


def test_write_manifest_refuses_nan(tmp_path):
    root = tmp_path / "b"
    root.mkdir()
    (root / "m.onnx").write_bytes(b"x")
    m = {"format_version": 1, "model": {"class_names": ["a", "b"], "gflops_per_slice": float("nan")},
         "preprocessing": {"window": [0, 1], "input_size": [32, 32]},
         "files": [file_entry(root / "m.onnx", root, precision="fp32", backends=["onnxruntime"])]}
    with pytest.raises(BundleError, match="NaN"):
        write_manifest(root, m)
    assert not (root / "manifest.json").exists()


def test_sha256_in_upper_case_is_accepted(bundle_copy):
    _edit_manifest(bundle_copy, lambda m: [f.update(sha256=f["sha256"].upper()) for f in m["files"]])
    b = load_bundle(bundle_copy)
    assert b.read_verified(b.files[0]) == (bundle_copy / b.files[0]["path"]).read_bytes()


def test_symlinked_file_or_folder_pointing_outside_is_refused(bundle_copy, tmp_path):
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    model = bundle_copy / "model.fp32.onnx"
    shutil.copy(model, outside / "model.fp32.onnx")
    model.unlink()
    model.symlink_to(outside / "model.fp32.onnx")
    with pytest.raises(BundleError, match=r"model\.fp32\.onnx resolves to .*elsewhere.*outside the bundle"):
        load_bundle(bundle_copy)
    model.unlink()
    (bundle_copy / "sub").symlink_to(outside, target_is_directory=True)
    _edit_manifest(bundle_copy, lambda m: m["files"][0].update(path="sub/model.fp32.onnx"))
    with pytest.raises(BundleError, match=r"sub/model\.fp32\.onnx resolves to .*outside the bundle"):
        load_bundle(bundle_copy)
    # a manifest that is a symlink to a file outside is refused too
    (bundle_copy / "manifest.json").rename(outside / "manifest.json")
    (bundle_copy / "manifest.json").symlink_to(outside / "manifest.json")
    with pytest.raises(BundleError, match=r"manifest\.json resolves to .*outside the bundle"):
        load_bundle(bundle_copy)


def test_symlinks_inside_the_bundle_and_a_symlinked_bundle_are_fine(bundle_copy, tmp_path):
    (bundle_copy / "real").mkdir()
    (bundle_copy / "model.fp32.onnx").rename(bundle_copy / "real" / "model.fp32.onnx")
    (bundle_copy / "model.fp32.onnx").symlink_to(Path("real") / "model.fp32.onnx")
    link = tmp_path / "current.bundle"
    link.symlink_to(bundle_copy, target_is_directory=True)
    assert load_bundle(link).precisions == ["fp32", "fp16", "int8"]


def _other_model_bytes(tmp_path):
    """A valid ONNX model of the same size class that labels everything differently."""
    import numpy as np
    import onnx
    from tests.helpers import conv_graph

    graph = conv_graph("fp32", (32, 32))
    from onnx import numpy_helper
    graph.graph.initializer[0].CopyFrom(numpy_helper.from_array(np.array([10.0, -10.0, 0.0], np.float32)
                                                                .reshape(3, 1, 1, 1), "W"))
    path = tmp_path / "other.onnx"
    onnx.save(graph, str(path))
    return path.read_bytes()


def test_a_model_swapped_after_load_bundle_is_never_run(bundle_copy, tmp_path, monkeypatch):
    import onnxruntime

    from regionkd.sdk.segmenter import Segmenter

    b = load_bundle(bundle_copy)
    (bundle_copy / "model.fp32.onnx").write_bytes(_other_model_bytes(tmp_path))
    sessions = []
    real = onnxruntime.InferenceSession
    monkeypatch.setattr(onnxruntime, "InferenceSession", lambda *a, **k: sessions.append(a) or real(*a, **k))
    with pytest.raises(BundleError, match=r"model\.fp32\.onnx .*since the bundle was loaded"):
        Segmenter(b, backend="onnxruntime")
    assert sessions == []


def test_the_session_runs_the_bytes_that_were_hashed(bundle_copy, monkeypatch):
    import onnxruntime

    from regionkd.sdk.segmenter import Segmenter

    seen = []
    real = onnxruntime.InferenceSession
    monkeypatch.setattr(onnxruntime, "InferenceSession", lambda model, **k: seen.append(model) or real(model, **k))
    with Segmenter(bundle_copy, backend="onnxruntime"):
        pass
    entry = load_bundle(bundle_copy).select_file("fp32", "onnxruntime")
    assert len(seen) == 1 and isinstance(seen[0], bytes)
    assert hashlib.sha256(seen[0]).hexdigest() == entry["sha256"]


def test_manifest_that_disagrees_with_its_model_is_refused_at_load(bundle_copy):
    from regionkd.sdk.segmenter import Segmenter

    _edit_manifest(bundle_copy, _set("preprocessing", "input_size", [64, 64]))
    with pytest.raises(BundleError, match=r"takes 32x32 slices, the manifest's preprocessing\.input_size says 64x64"):
        Segmenter(bundle_copy, backend="onnxruntime")
    _edit_manifest(bundle_copy, _set("preprocessing", "input_size", [32, 32]))
    _edit_manifest(bundle_copy, lambda m: m["model"].update(num_classes=4, class_names=["bg", "liver", "tumour", "cyst"]))
    with pytest.raises(BundleError, match=r"outputs 3 classes, the manifest names 4"):
        Segmenter(bundle_copy, backend="onnxruntime")


def test_the_file_kinds_table_names_every_precision_backend_and_file(tiny_bundle):
    """One table says which files a bundle holds; the schema's names and the writer's entries come from it."""
    from regionkd.sdk import bundle_files as bf

    assert bf.PRECISIONS == ("fp32", "fp16", "int8")
    assert bf.BACKENDS == ("onnxruntime", "tensorrt", "tensorrt-rtx")
    assert bf.FILE_FORMATS == ("onnx", "tensorrt-engine", "tensorrt-rtx-engine")
    assert bf.INT8_FLAVOURS == ("tensorrt", "cpu")
    assert [k.path() for k in bf.NETWORK_KINDS] == ["model.fp32.onnx", "model.fp16.onnx", "model.int8.onnx",
                                                    "model.int8-cpu.onnx"]
    assert [bf.fused_kind(k.key).path() for k in bf.NETWORK_KINDS] == [
        "model.fp32.fused.onnx", "model.fp16.fused.onnx", "model.int8.fused.onnx", "model.int8-cpu.fused.onnx"]
    assert all(bf.fused_kind(k.key).manifest_fields() == {**k.manifest_fields(), "graph": "fused"}
               for k in bf.NETWORK_KINDS)
    assert bf.engine_kind("tensorrt").path(version="10.3.0", sm="87", precision="int8") == \
        "engines/trt10.3.0-sm87-int8.engine"
    with pytest.raises(BundleError, match="unknown kind of bundle file 'int4'"):
        bf.file_kind("int4")
    # the entries of a bundle written by hand to the same contract carry exactly the table's fields
    for entry in load_bundle(tiny_bundle).files:
        kind = next(k for k in bf.ONNX_KINDS if k.path() == entry["path"])
        assert {f: entry[f] for f in kind.manifest_fields()} == kind.manifest_fields()
