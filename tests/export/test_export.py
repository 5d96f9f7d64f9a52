"""Export pieces on tiny networks and hand-made arrays: ONNX parity, FP16 IO types, the two INT8
Q/DQ flavours read back from the graph, sizes, the Dice gate, the TensorRT op refusal, the Dice
accumulator, stratified calibration sampling and atomic bundle directories."""
from __future__ import annotations

import json
import types
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
nn = torch.nn

import onnx  # noqa: E402
from onnx import TensorProto, numpy_helper  # noqa: E402

from regionkd.export import bundle_writer as bw  # noqa: E402
from regionkd.export import ct_slices  # noqa: E402
from regionkd.export.onnx_export import (ExportError, export_onnx, onnx_parity, ort_session,  # noqa: E402
                                         run_onnx)
from regionkd.export.precision import (PrecisionError, calibration_reader, check_dice_drop,  # noqa: E402
                                       compact_graph, convert_fp16, input_layers, qdq_summary, quantize_int8,
                                       tensorrt_qdq_problems)
from regionkd.train.metrics import DiceAccumulator  # noqa: E402

SIZE = (32, 32)


class TinySegNet(nn.Module):
    """Conv-BN-ReLU encoder, bilinear upsampling, 1x1 head: the op mix of the real students."""

    def __init__(self, width=8, num_classes=3):
        super().__init__()
        self.enc1 = nn.Sequential(nn.Conv2d(1, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU())
        self.enc2 = nn.Sequential(nn.MaxPool2d(2), nn.Conv2d(width, 2 * width, 3, padding=1),
                                  nn.BatchNorm2d(2 * width), nn.ReLU(), nn.Conv2d(2 * width, 2 * width, 3, padding=1),
                                  nn.ReLU())
        self.up = nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False)
        self.head = nn.Conv2d(3 * width, num_classes, 1)

    def forward(self, x):
        a = self.enc1(x)
        return self.head(torch.cat([a, self.up(self.enc2(a))], dim=1))


class PoolIndicesNet(nn.Module):
    """ENet-style max pooling that keeps its indices (for un-pooling): TensorRT's ONNX parser
    does not take a MaxPool with an Indices output."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.pool = nn.MaxPool2d(2, return_indices=True)
        self.up = nn.Upsample(scale_factor=2, mode="nearest")
        self.head = nn.Conv2d(4, 3, 1)

    def forward(self, x):
        y, idx = self.pool(self.conv(x))
        y = y + (idx % 2).to(y.dtype)  # the indices feed the rest of the network, as un-pooling would
        return self.head(self.up(y))


def phantom_slices(n=12, size=SIZE, seed=0):
    """Preprocessed-looking slices: a bright disc (organ) with a darker blob (lesion) in noise, in [-1, 1]."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size[0], :size[1]]
    out = np.empty((n, 1) + tuple(size), np.float32)
    for i in range(n):
        cy, cx = size[0] / 2 + rng.uniform(-3, 3), size[1] / 2 + rng.uniform(-3, 3)
        img = np.full(size, -0.9, np.float32)
        img[(yy - cy) ** 2 + (xx - cx) ** 2 < (size[0] / 3) ** 2] = 0.3
        img[(yy - cy - 2) ** 2 + (xx - cx + 1) ** 2 < 9] = -0.1
        out[i, 0] = np.clip(img + rng.normal(0, 0.05, size), -1, 1)
    return out


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A seeded tiny model trained for nothing (random weights), its fp32 ONNX and real-ish slices."""
    torch.manual_seed(0)
    model = TinySegNet().eval()
    d = tmp_path_factory.mktemp("tiny")
    export_onnx(model, d / "model.fp32.onnx", SIZE)
    return types.SimpleNamespace(model=model, dir=d, fp32=d / "model.fp32.onnx", images=phantom_slices())


@pytest.fixture(scope="module")
def int8(tiny):
    cache = tiny.dir / "calibration.json"
    trt = quantize_int8(tiny.fp32, tiny.dir / "model.int8.onnx", "tensorrt", cache, tiny.images)
    cpu = quantize_int8(tiny.fp32, tiny.dir / "model.int8-cpu.onnx", "cpu", cache)  # reuses the ranges
    return types.SimpleNamespace(trt=trt, cpu=cpu, cache=cache)


def _init(proto, name):
    return next(t for t in proto.graph.initializer if t.name == name)


def test_onnx_graph_io_and_dynamic_batch(tiny):
    proto = onnx.load(str(tiny.fp32))
    assert [i.name for i in proto.graph.input] == ["image"]
    assert [o.name for o in proto.graph.output] == ["logits"]
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param  # symbolic batch axis
    assert max(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")) == 17
    assert "BatchNormalization" not in {n.op_type for n in proto.graph.node}  # folded into Conv
    out = run_onnx(ort_session(tiny.fp32), tiny.images[:5], batch_size=5)
    assert out.shape == (5, 3) + SIZE


def test_onnx_parity_against_pytorch(tiny):
    parity = onnx_parity(tiny.model, tiny.fp32, tiny.images)
    assert parity.slices == len(tiny.images)
    assert parity.max_abs_logit_diff < 1e-4
    assert parity.argmax_agreement == 1.0


def test_fp16_graph_has_float32_io_and_half_weights(tiny):
    half = convert_fp16(tiny.fp32, tiny.dir / "model.fp16.onnx")
    assert half.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT
    assert half.graph.output[0].type.tensor_type.elem_type == TensorProto.FLOAT
    conv_weights = [_init(half, n.input[1]) for n in half.graph.node if n.op_type == "Conv"]
    assert conv_weights and all(w.data_type == TensorProto.FLOAT16 for w in conv_weights)
    ref = run_onnx(ort_session(tiny.fp32), tiny.images)
    got = run_onnx(ort_session(tiny.dir / "model.fp16.onnx"), tiny.images)
    assert got.dtype == np.float32
    assert np.max(np.abs(ref - got)) < 1e-2          # fp16 rounding, not a different network
    assert np.max(np.abs(ref - got)) > 0             # and it really computes in half precision


def test_int8_tensorrt_flavour_is_symmetric_int8_with_float_biases(tiny, int8):
    proto = int8.trt
    s = qdq_summary(proto)
    assert s["zero_point_types"] == ["INT8"]
    assert s["nonzero_zero_points"] == []
    assert "INT32" not in s["dequantized_initializer_types"]  # no int32 bias DequantizeLinear (onnx-tensorrt#850)
    assert s["bias_types"] == ["FLOAT"]
    assert tensorrt_qdq_problems(proto) == []
    # every Conv weight but the input layer's (float, see input_layers) is dequantized per output channel from int8
    producers = {o: n for n in proto.graph.node for o in n.output}
    convs = [n for n in proto.graph.node if n.op_type == "Conv"]
    assert len(convs) == 4
    for conv in convs:
        if "image" in conv.input:
            continue
        dq = producers[conv.input[1]]
        assert dq.op_type == "DequantizeLinear"
        w, scale = _init(proto, dq.input[0]), _init(proto, dq.input[1])
        assert w.data_type == TensorProto.INT8
        assert list(scale.dims) == [w.dims[0]]
    # all zero-point values really are 0
    for n in proto.graph.node:
        if n.op_type in ("QuantizeLinear", "DequantizeLinear") and len(n.input) > 2:
            assert not np.any(numpy_helper.to_array(_init(proto, n.input[2])))


def test_compact_graph_drops_dead_nodes_and_unused_initializers(int8):
    # the quantizer can leave float originals behind (seen on a trained MobileNetV2: onnxruntime then
    # warns on every load); compact_graph removes whatever no node reads
    proto = onnx.ModelProto()
    proto.CopyFrom(int8.trt)
    proto.graph.initializer.append(numpy_helper.from_array(np.ones(1000, np.float32), "left_behind"))
    proto.graph.node.append(onnx.helper.make_node("Constant", [], ["dead_constant"],
                                                  value=numpy_helper.from_array(np.ones(3, np.float32))))
    compact_graph(proto)
    used = {name for node in proto.graph.node for name in node.input}
    assert [t.name for t in proto.graph.initializer if t.name not in used] == []
    assert len(proto.graph.initializer) == len(int8.trt.graph.initializer)
    assert len(proto.graph.node) == len(int8.trt.graph.node)      # the dead Constant is gone, nothing else


def test_int8_cpu_flavour_has_uint8_activations_and_is_refused_for_tensorrt(int8):
    proto = int8.cpu
    act_q = [n for n in proto.graph.node if n.op_type == "QuantizeLinear"]
    assert act_q
    assert {_init(proto, n.input[2]).data_type for n in act_q} == {TensorProto.UINT8}
    weights_dq = [n for n in proto.graph.node if n.op_type == "DequantizeLinear" and
                  any(t.name == n.input[0] and len(t.dims) == 4 for t in proto.graph.initializer)]
    assert weights_dq and all(_init(proto, n.input[0]).data_type == TensorProto.INT8 for n in weights_dq)
    # the default bias quantization of this flavour is exactly what TensorRT's parser rejects
    assert any("int32 bias" in p for p in tensorrt_qdq_problems(proto))


def _first_quantize_scale(proto) -> float:
    q = next(n for n in proto.graph.node if n.op_type == "QuantizeLinear")
    return float(numpy_helper.to_array(_init(proto, q.input[1])))


def test_the_calibration_cache_gets_normal_permissions(int8):
    import os
    from regionkd.sdk.atomic import current_umask

    assert os.stat(int8.cache).st_mode & 0o777 == 0o666 & ~current_umask()   # not the quantizer's mkstemp 0600


def test_both_int8_flavours_come_from_one_calibration(int8):
    """The cached range of the first quantized tensor gives the symmetric scale max|range| / 127
    of the TensorRT flavour and the asymmetric (hi - lo) / 255 of the CPU flavour."""
    ranges = json.loads(int8.cache.read_text())["data"]
    trt_scale, cpu_scale = _first_quantize_scale(int8.trt), _first_quantize_scale(int8.cpu)
    matches = []
    for r in ranges.values():
        lo, hi = min(r["lowest"]["data"][0], 0.0), max(r["highest"]["data"][0], 0.0)  # ranges always include 0
        if lo == hi:
            continue
        if (trt_scale == pytest.approx(max(abs(lo), abs(hi)) / 127, rel=0.02)
                and cpu_scale == pytest.approx((hi - lo) / 255, rel=0.02)):
            matches.append(r)
    assert matches, (trt_scale, cpu_scale)


def test_int8_layers_reading_the_input_stay_float(tiny, int8):
    """8 bits over the HU window would merge lesion and organ intensities: the layers that read
    the network input run in float, everything after them in int8."""
    fp32 = onnx.load(str(tiny.fp32))
    assert input_layers(fp32) == [n.name for n in fp32.graph.node if "image" in n.input]
    for proto in (int8.trt, int8.cpu):
        readers = [n for n in proto.graph.node if "image" in n.input]
        assert readers and all(n.op_type not in ("QuantizeLinear", "DequantizeLinear") for n in readers)
        floats = {t.name for t in proto.graph.initializer if t.data_type == TensorProto.FLOAT}
        assert all(n.input[1] in floats for n in readers if n.op_type == "Conv")  # weights not dequantized int8
        assert sum(n.op_type == "QuantizeLinear" for n in proto.graph.node) > 0


def test_int8_outputs_close_to_fp32(tiny, int8):
    ref = run_onnx(ort_session(tiny.fp32), tiny.images)
    for name in ("model.int8.onnx", "model.int8-cpu.onnx"):
        got = run_onnx(ort_session(tiny.dir / name), tiny.images)
        assert np.mean(np.argmax(ref, 1) == np.argmax(got, 1)) > 0.95, name


def test_int8_file_at_most_30_percent_of_fp32_for_a_real_sized_model(tmp_path):
    torch.manual_seed(0)
    model = TinySegNet(width=48).eval()  # ~90 k weights: weight bytes dominate the file, as in the students
    export_onnx(model, tmp_path / "fp32.onnx", SIZE)
    quantize_int8(tmp_path / "fp32.onnx", tmp_path / "int8.onnx", "tensorrt", tmp_path / "cal.json", phantom_slices())
    fp32, int8 = (tmp_path / "fp32.onnx").stat().st_size, (tmp_path / "int8.onnx").stat().st_size
    assert int8 <= 0.30 * fp32, (int8, fp32)


def test_quantization_keeps_only_the_quantizer_quiet(tiny, tmp_path, caplog):
    """The quantizer's advice (logged partly on the root logger) is dropped while it runs; the root
    logger's level, handlers and filters are as before, and every other record still gets through."""
    import logging

    import onnxruntime.quantization

    from regionkd.export.precision import quiet_quantizer

    root = logging.getLogger()
    before = (root.level, list(root.handlers), list(root.filters), logging.getLogger("onnxruntime.quantization").level)
    quantize_int8(tiny.fp32, tmp_path / "q.onnx", "tensorrt", tmp_path / "cal.json", tiny.images)
    assert (root.level, list(root.handlers), list(root.filters),
            logging.getLogger("onnxruntime.quantization").level) == before
    quantizer_file = str(Path(onnxruntime.quantization.__file__).parent / "quant_utils.py")
    with caplog.at_level(logging.WARNING), quiet_quantizer():
        logging.getLogger("regionkd.export.pipeline").warning("ours")
        logging.warning("the root's own")
        root.handle(logging.LogRecord("root", logging.WARNING, quantizer_file, 1, "advice", None, None))
        root.handle(logging.LogRecord("root", logging.ERROR, quantizer_file, 1, "failure", None, None))
    assert [r.getMessage() for r in caplog.records] == ["ours", "the root's own", "failure"]


def test_calibration_refuses_missing_slices(tiny, tmp_path):
    with pytest.raises(PrecisionError, match="--calib"):
        quantize_int8(tiny.fp32, tmp_path / "x.onnx", "tensorrt", tmp_path / "none.json", None)
    assert not (tmp_path / "x.onnx").exists()


def test_calibration_reader_feeds_the_given_slices_and_rewinds():
    images = phantom_slices(3)
    reader = calibration_reader(images)
    got = [reader.get_next() for _ in range(4)]
    assert got[3] is None
    assert np.array_equal(np.concatenate([g["image"] for g in got[:3]]), images)
    reader.rewind()
    assert np.array_equal(reader.get_next()["image"], images[:1])


def test_max_dice_drop_refuses_and_says_by_how_much():
    fp32 = {"liver": 0.95, "tumour": 0.60}
    check_dice_drop(fp32, {"liver": 0.945, "tumour": 0.592}, 0.01, "int8")  # 0.005 and 0.008: within
    with pytest.raises(PrecisionError) as err:
        check_dice_drop(fp32, {"liver": 0.945, "tumour": 0.57}, 0.01, "int8 TensorRT flavour")
    msg = str(err.value)
    assert "int8 TensorRT flavour" in msg and "'tumour'" in msg and "drop 0.0300" in msg
    assert "liver" not in msg


def test_unsupported_op_stops_export_naming_op_and_layer(tmp_path):
    with pytest.raises(ExportError) as err:
        export_onnx(PoolIndicesNet().eval(), tmp_path / "pool.onnx", SIZE)
    msg = str(err.value)
    assert "MaxPool in layer '/pool/MaxPool'" in msg and "return_indices" in msg
    assert not (tmp_path / "pool.onnx").exists()


def test_dice_accumulator_hand_computed():
    acc = DiceAccumulator(3)
    acc.add(np.array([[0, 1, 1], [2, 2, 0]]), np.array([[0, 1, 1], [2, 0, 0]]))
    # liver: 2 agree, |p|=2, |g|=2 -> 1.0; tumour: 1 agrees, |p|=2, |g|=1 -> 2/3
    assert acc.dice(["bg", "liver", "tumour"]) == pytest.approx({"liver": 1.0, "tumour": 2 / 3})
    acc.add(np.array([0, 0]), np.array([1, 0]))  # a second volume: liver gets one more true voxel, missed
    assert acc.dice(["bg", "liver", "tumour"])["liver"] == pytest.approx(4 / 5)
    assert DiceAccumulator(3).dice(["bg", "liver", "tumour"]) == {"liver": None, "tumour": None}


def test_validation_dice_is_the_dice_of_the_masks_the_segmenter_gives(exact_bundle):
    """The export's Dice goes through the runtime's Segmenter, on the image in its file's own voxel
    order (here flipped left-right, so canonical and file order differ): the hand-built threshold
    model over a phantom whose stray liver-density blob only the largest-component step removes
    gives a perfect Dice with that step and a lower liver Dice without it."""
    from tests.helpers import EXACT_SHAPE, TINY_CLASSES, expected_labels_from_hu, make_phantom

    from regionkd.export.validation import evaluate_dice
    from regionkd.sdk.bundle import load_bundle
    from regionkd.sdk.orientation import to_canonical

    hu, affine = make_phantom(shape=EXACT_SHAPE, with_distractor=True)
    truth = expected_labels_from_hu(make_phantom(shape=EXACT_SHAPE, with_distractor=False)[0])
    flip = np.diag([-1.0, 1.0, 1.0, 1.0])
    flip[0, 3] = EXACT_SHAPE[0] - 1
    file_affine = affine @ flip                          # the file stores x from right to left
    volume = to_canonical(hu[::-1].copy(), file_affine)
    case = types.SimpleNamespace(case_id="flipped", volume=volume,
                                 label=to_canonical(truth[::-1].copy(), file_affine).data)
    assert np.array_equal(volume.data, hu)               # canonical order is not the file's
    prep = load_bundle(exact_bundle).preprocessing
    models = {"fp32": (exact_bundle / "model.fp32.onnx", "fp32", "network")}
    dice = evaluate_dice(models, [case], prep, TINY_CLASSES)["fp32"]
    assert dice == {"liver": 1.0, "tumour": 1.0}
    raw = evaluate_dice(models, [case], {**prep, "largest_component_labels": []}, TINY_CLASSES)["fp32"]
    assert raw["tumour"] == 1.0 and raw["liver"] < 1.0
    with pytest.raises(ValueError, match="no validation cases"):
        evaluate_dice(models, [], prep, TINY_CLASSES)


class _FakeCase:
    def __init__(self, case_id, hu, label):
        self.case_id, self.label = case_id, label
        self.volume = types.SimpleNamespace(data=hu)


def test_stratified_slices_include_every_lesion_slice(monkeypatch, tmp_path):
    """3 cases x 10 slices; 4 lesion, 10 organ-only, 16 background slices: asking for 10 takes all
    4 lesion slices (short of the 5 wanted), gives the spare to organ slices (3 + 2) and 1 background."""
    rng = np.random.default_rng(0)
    cases = {}
    for k in range(3):
        label = np.zeros((8, 8, 10), np.uint8)
        hu = rng.normal(0, 20, (8, 8, 10)).astype(np.float32)
        organ = {0: [2, 3, 4, 5], 1: [0, 1, 2], 2: [4, 5, 6, 7, 8]}[k][:]
        lesion = {0: [4, 5], 1: [], 2: [6, 8]}[k]
        for z in organ:
            label[2:6, 2:6, z] = 1
        for z in lesion:
            label[3, 3, z] = 2
        hu[..., :] += np.arange(10) * 1000 + k * 100  # slice identity readable from the HU level
        cases[f"c{k}"] = _FakeCase(f"c{k}", hu, label)
    fake = types.SimpleNamespace(case_ids=list(cases), load_case=lambda cid: cases[cid])
    import regionkd.train.data as data
    monkeypatch.setattr(data, "open_dataset", lambda root: fake, raising=False)
    sample = ct_slices.stratified_slices(tmp_path, 10, window=(-100000, 100000), input_size=(8, 8))
    assert sample.strata == {"lesion": 4, "organ": 5, "background": 1}
    assert sample.images.shape == (10, 1, 8, 8)
    assert {("c0", 4), ("c0", 5), ("c2", 6), ("c2", 8)} <= set(sample.source)
    # the images are the chosen slices, windowed to [-1, 1]: check one by its HU level
    i = sample.source.index(("c2", 8))
    assert sample.images[i].mean() == pytest.approx((8 * 1000 + 200) / 100000, abs=2e-3)


def test_interrupted_bundle_leaves_nothing_and_keeps_the_old_one(tmp_path):
    final = tmp_path / "bundle"
    with pytest.raises(KeyboardInterrupt):
        with bw.bundle_directory(final) as tmp:
            (tmp / "model.fp32.onnx").write_bytes(b"half written")
            raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []
    final.mkdir()
    (final / "manifest.json").write_text("{}")
    with pytest.raises(FileExistsError, match="--overwrite"):
        with bw.bundle_directory(final):
            pass
    with pytest.raises(RuntimeError):
        with bw.bundle_directory(final, overwrite=True) as tmp:
            (tmp / "model.fp32.onnx").write_bytes(b"x")
            raise RuntimeError("export failed")
    assert [p.name for p in tmp_path.iterdir()] == ["bundle"]
    assert (final / "manifest.json").read_text() == "{}"


def test_bundle_preprocessing_names_the_organ_components_of_the_task():
    from regionkd.export.bundle_writer import preprocessing_section

    pre = {"window": [-200, 300], "input_size": [64, 64]}
    kidney = preprocessing_section({"task": "kidney", "preprocessing": pre})
    assert kidney["largest_component_labels"] == [1] and kidney["largest_component_counts"] == {"1": 2}
    liver = preprocessing_section({"task": "liver", "preprocessing": pre})
    assert liver["largest_component_labels"] == [1] and "largest_component_counts" not in liver
    assert preprocessing_section({"task": "kidney", "preprocessing": pre}, [])["largest_component_labels"] == []
    # a checkpoint of no known task: worked out from the class names once, at export, and written
    guessed = preprocessing_section({"class_names": ["background", "kidney", "tumour"], "preprocessing": pre})
    assert guessed["largest_component_labels"] == [1] and guessed["largest_component_counts"] == {"1": 2}
    other = preprocessing_section({"task": "spleen", "class_names": ["background", "spleen", "lesion"],
                                   "preprocessing": pre})
    assert other["largest_component_labels"] == [1] and "largest_component_counts" not in other


def test_a_killed_export_leaves_a_temporary_bundle_the_next_export_removes(tmp_path):
    import os
    import signal
    import subprocess
    import sys

    from regionkd.export.bundle_writer import bundle_directory
    from regionkd.sdk.atomic import is_temp_name

    out = tmp_path / "model.bundle"
    script = ("import os, signal\nfrom regionkd.export.bundle_writer import bundle_directory\n"
              f"with bundle_directory({str(out)!r}) as tmp:\n"
              "    (tmp / 'model.fp32.onnx').write_bytes(b'0' * 3_000_000)\n"
              "    os.kill(os.getpid(), signal.SIGKILL)\n")
    assert subprocess.run([sys.executable, "-c", script], timeout=120).returncode == -signal.SIGKILL
    (left,) = list(tmp_path.iterdir())
    assert is_temp_name(left.name) and left.name.startswith(".model.bundle")
    with bundle_directory(out) as tmp:
        (tmp / "manifest.json").write_text("{}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.bundle"]
    assert oct(os.stat(out).st_mode & 0o777) == oct(0o777 & ~_umask())


def _umask() -> int:
    import os
    mask = os.umask(0)
    os.umask(mask)
    return mask
