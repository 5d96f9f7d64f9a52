"""What the tests share besides fixtures (those are in conftest.py).

A real tiny model bundle (hand-built ONNX graphs, checksummed manifest) and a
small synthetic CT phantom, both independent of the export and phantom code.

The tiny model is one 1x1 convolution, so its output is known by hand. With x the windowed input
(HU window [-60, 140] -> x = (HU - 40) / 100), the logits are
    background = -10 (x + 0.5),   liver = 10 x,   tumour = 0,
so the argmax is: HU < -10 -> background, -10 < HU < 40 -> tumour, HU > 40 -> liver.
The phantom: air (-1000), body fat (-100), a liver ellipsoid (80 HU) holding a tumour sphere
(20 HU), and a small separate liver-density blob that the largest-component step removes.
"""
from __future__ import annotations

import numpy as np

TINY_WINDOW = [-60, 140]
TINY_CLASSES = ["background", "liver", "tumour"]
# 1x1 conv weights/biases per class (see module doc)
TINY_WEIGHTS = np.array([-10.0, 10.0, 0.0], dtype=np.float32)
TINY_BIASES = np.array([-5.0, 0.0, 0.0], dtype=np.float32)

AIR, FAT, LIVER, TUMOUR = -1000.0, -100.0, 80.0, 20.0
EXACT_SIZE = (64, 32)          # exact_bundle's network size: the slices of make_phantom(EXACT_SHAPE)
EXACT_SHAPE = (64, 32, 12)


def expected_labels_from_hu(hu: np.ndarray) -> np.ndarray:
    """What the tiny model gives per voxel when no resize is involved (see module doc)."""
    x = np.clip(hu, *TINY_WINDOW)
    x = (x - 40.0) / 100.0
    logits = np.stack([TINY_WEIGHTS[c] * x + TINY_BIASES[c] for c in range(3)])
    return np.argmax(logits, axis=0).astype(np.uint8)


def conv_graph(precision: str, input_size, fixed_batch=None):
    """ONNX model: image (N,1,H,W) float32 -> logits (N,3,H,W) float32 for one precision flavour."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    h, w = input_size
    batch = fixed_batch if fixed_batch else "N"
    inp = helper.make_tensor_value_info("image", TensorProto.FLOAT, [batch, 1, h, w])
    out = helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, 3, h, w])
    weight = TINY_WEIGHTS.reshape(3, 1, 1, 1)
    nodes, inits = [], []
    if precision == "fp32":
        inits += [numpy_helper.from_array(weight, "W"), numpy_helper.from_array(TINY_BIASES, "B")]
        nodes.append(helper.make_node("Conv", ["image", "W", "B"], ["logits"]))
    elif precision == "fp16":
        inits += [numpy_helper.from_array(weight.astype(np.float16), "W"),
                  numpy_helper.from_array(TINY_BIASES.astype(np.float16), "B")]
        nodes += [helper.make_node("Cast", ["image"], ["x16"], to=TensorProto.FLOAT16),
                  helper.make_node("Conv", ["x16", "W", "B"], ["y16"]),
                  helper.make_node("Cast", ["y16"], ["logits"], to=TensorProto.FLOAT)]
    else:  # int8 Q/DQ: "cpu" flavour uint8 activations, "tensorrt" flavour symmetric int8
        act_type = np.uint8 if precision == "int8-cpu" else np.int8
        act_zp = 128 if precision == "int8-cpu" else 0
        w_scale = np.float32(10.0 / 127)
        inits += [numpy_helper.from_array(np.float32(1.0 / 127), "x_scale"),
                  numpy_helper.from_array(np.array(act_zp, dtype=act_type), "x_zp"),
                  numpy_helper.from_array(np.round(weight / w_scale).astype(np.int8), "Wq"),
                  numpy_helper.from_array(w_scale, "w_scale"),
                  numpy_helper.from_array(np.array(0, dtype=np.int8), "w_zp"),
                  numpy_helper.from_array(TINY_BIASES, "B")]
        nodes += [helper.make_node("QuantizeLinear", ["image", "x_scale", "x_zp"], ["xq"]),
                  helper.make_node("DequantizeLinear", ["xq", "x_scale", "x_zp"], ["xdq"]),
                  helper.make_node("DequantizeLinear", ["Wq", "w_scale", "w_zp"], ["Wdq"]),
                  helper.make_node("Conv", ["xdq", "Wdq", "B"], ["logits"])]
    graph = helper.make_graph(nodes, "tiny", [inp], [out], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def build_tiny_bundle(root, input_size=(32, 32), max_batch=4, precisions=("fp32", "fp16", "int8"),
                      largest_component_labels=(1,), fixed_batch=None):
    """Write a real bundle (ONNX files + checksummed manifest) into the new directory `root`."""
    import onnx

    from regionkd.sdk.bundle import FORMAT_VERSION, file_entry, write_manifest

    root.mkdir(parents=True)
    flavours = {
        "fp32": [("model.fp32.onnx", "fp32", dict(flavour="reference", backends=["onnxruntime", "tensorrt"]))],
        "fp16": [("model.fp16.onnx", "fp16", dict(flavour="reference", backends=["onnxruntime", "tensorrt"]))],
        "int8": [("model.int8.onnx", "int8", dict(flavour="tensorrt", backends=["tensorrt"])),
                 ("model.int8-cpu.onnx", "int8-cpu", dict(flavour="cpu", backends=["onnxruntime"]))],
    }
    files = []
    for precision in precisions:
        for name, graph_kind, fields in flavours[precision]:
            onnx.save(conv_graph(graph_kind, input_size, fixed_batch), str(root / name))
            files.append(file_entry(root / name, root, format="onnx", precision=precision, **fields))
    manifest = {
        "format_version": FORMAT_VERSION,
        "model": {"name": "tiny-threshold", "arch": "conv1x1", "num_classes": 3, "class_names": TINY_CLASSES,
                  "params": 6, "gflops_per_slice": 0.0},
        "preprocessing": {"window": TINY_WINDOW, "input_size": list(input_size), "orientation": "RAS",
                          "slice_axis": "axial", "normalisation": {"type": "window-linear", "range": [-1, 1]},
                          "largest_component_labels": list(largest_component_labels),
                          "spacing": {"in_plane_mm": [0.6, 1.0], "slice_thickness_mm": [1.0, 5.0]}},
        "io": {"input": "image", "output": "logits", "max_batch": max_batch},
        "files": files,
        "metrics": {},
        "provenance": {"package_version": "test", "data": "hand-built 1x1 conv"},
    }
    write_manifest(root, manifest)
    return root


def make_phantom(shape=(40, 36, 12), spacing=(0.8, 0.9, 2.5), with_distractor=True):
    """(hu float32 in RAS voxel order, RAS affine). Labels by construction: see module doc."""
    x, y, z = np.meshgrid(*(np.arange(n, dtype=np.float32) for n in shape), indexing="ij")
    cx, cy, cz = (shape[0] - 1) / 2, (shape[1] - 1) / 2, (shape[2] - 1) / 2
    hu = np.full(shape, AIR, dtype=np.float32)
    body = ((x - cx) / (0.47 * shape[0])) ** 2 + ((y - cy) / (0.45 * shape[1])) ** 2 <= 1
    hu[body] = FAT
    # liver: off-centre (towards low x, high y) so a wrong flip would move it
    lx, ly = 0.36 * shape[0], 0.58 * shape[1]
    liver = (((x - lx) / (0.22 * shape[0])) ** 2 + ((y - ly) / (0.25 * shape[1])) ** 2
             + ((z - cz) / (0.42 * shape[2])) ** 2) <= 1
    hu[liver] = LIVER
    tumour = ((x - lx - 2) ** 2 + (y - ly) ** 2 + ((z - cz) * 2) ** 2) <= 9
    hu[tumour] = TUMOUR
    if with_distractor:  # a small liver-density blob far from the liver, at one end in z
        blob = ((x - 0.72 * shape[0]) ** 2 + (y - 0.3 * shape[1]) ** 2 <= 4) & (z >= shape[2] - 3)
        hu[blob] = LIVER
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = [-10.0, 20.5, -33.0]
    return hu, affine


def run_main(main, argv, capsys):
    """Run a CLI's main() in-process: (exit code, stdout, stderr)."""
    try:
        main([str(a) for a in argv])
        code = 0
    except SystemExit as exc:
        code = exc.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def write_phantom_series(folder, shape=(40, 36, 12), spacing=(0.8, 0.9, 2.5), with_distractor=False, **kwargs):
    """The make_phantom CT written as a DICOM CT series in `folder`: (SeriesInfo, hu, affine)."""
    from regionkd.sdk.dicom_write import write_ct_series

    hu, affine = make_phantom(shape=shape, spacing=spacing, with_distractor=with_distractor)
    return write_ct_series(hu, affine, folder, **kwargs), hu, affine

