"""Every registered network: output and feature shapes at 64x64, parameter counts near the
published sizes, and an ONNX export whose op types TensorRT's parser supports."""
from __future__ import annotations

import io

import onnx
import pytest
import torch

from regionkd.export.trt_ops import unsupported_ops
from regionkd.sdk.errors import RegionKDError
from regionkd.train.models import create_model, list_models
from regionkd.train.models.profile import count_params, flops_per_slice, model_table

torch.set_num_threads(1)
ALL = list_models()


def test_registry_lists_the_issue_networks():
    assert {"raunet", "enet", "mobilenetv2", "mobilenetv2-os8", "resnet18", "espnet", "unet", "tinynet"} <= set(ALL)


def test_unknown_model_names_the_known_ones():
    with pytest.raises(ValueError, match="enet") as err:
        create_model("enett")
    assert "enett" in str(err.value)
    assert isinstance(err.value, RegionKDError)       # a command prints it as one line and exits 1


@pytest.mark.parametrize("name", ALL)
def test_shapes_and_feature_strides(name):
    torch.manual_seed(0)
    model = create_model(name, num_classes=3).eval()
    x = torch.randn(2, 1, 64, 96)
    with torch.no_grad():
        logits, feats = model.forward_features(x)
        plain = model(x)
    assert logits.shape == (2, 3, 64, 96)
    assert logits.dtype == torch.float32
    assert torch.equal(plain, logits)
    assert feats["low"].shape[0] == 2 and feats["low"].shape[2:] == (32, 48)
    assert feats["high"].shape[2:] == (8, 12)


@pytest.mark.parametrize("name", ALL)
def test_two_classes_and_every_parameter_gets_a_gradient(name):
    # DistributedDataParallel (find_unused_parameters=False) needs every parameter used
    model = create_model(name, num_classes=2).train()
    logits, feats = model.forward_features(torch.randn(2, 1, 64, 64))
    assert logits.shape == (2, 2, 64, 64)
    (logits.mean() + feats["high"].mean()).backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


# published sizes (3 classes): ENet 0.36 M, ESPNet ~0.19 M, ResNet-18 11.2 M encoder, ResNet-34 21.3 M encoder
@pytest.mark.parametrize("name,lo,hi", [("enet", 0.33e6, 0.38e6), ("espnet", 0.17e6, 0.21e6),
                                        ("raunet", 20e6, 30e6), ("resnet18", 11e6, 12.5e6),
                                        ("tinynet", 20e3, 50e3), ("mobilenetv2", 1.5e6, 2.5e6)])
def test_param_counts(name, lo, hi):
    assert lo <= count_params(create_model(name)) <= hi


def test_count_params_by_hand():
    conv = torch.nn.Conv2d(2, 4, 3)  # 2*4*9 weights + 4 biases
    assert count_params(conv) == 76


def test_flops_by_hand():
    # 1x1 conv 1->4 channels, no bias, on 8x8: 64 pixels * 4 MACs = 256 MACs = 512 FLOPs
    conv = torch.nn.Conv2d(1, 4, 1, bias=False)
    assert flops_per_slice(conv, (8, 8)) == 512


def test_flops_ordering_at_384():
    rows = {r["name"]: r["gflops"] for r in model_table(["mobilenetv2", "resnet18", "mobilenetv2-os8"], (384, 384))}
    assert rows["mobilenetv2"] < rows["resnet18"] / 4
    assert 17 < rows["mobilenetv2-os8"] < 21 and rows["mobilenetv2-os8"] > rows["resnet18"]


def _export(model, x):
    buf = io.BytesIO()
    torch.onnx.export(model, x, buf, dynamo=False, opset_version=17, input_names=["image"],
                      output_names=["logits"], dynamic_axes={"image": {0: "n"}, "logits": {0: "n"}})
    return onnx.load_from_string(buf.getvalue())


@pytest.mark.parametrize("name", ALL)
def test_onnx_export_uses_tensorrt_ops(name):
    model = create_model(name).eval()
    x = torch.randn(1, 1, 64, 64)
    proto = _export(model, x)
    assert unsupported_ops(proto) == []
    ops = {n.op_type for n in proto.graph.node}
    assert "MaxUnpool" not in ops
    # the exported graph computes what the module computes (onnxruntime on CPU)
    import onnxruntime as ort

    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        ref = model(x).numpy()
    got = sess.run(None, {"image": x.numpy()})[0]
    assert got.shape == ref.shape
    assert abs(got - ref).max() < 1e-3 * max(1.0, abs(ref).max())


def test_enet_has_no_maxunpool_or_indices():
    proto = _export(create_model("enet").eval(), torch.randn(1, 1, 64, 64))
    ops = [n.op_type for n in proto.graph.node]
    assert "MaxUnpool" not in ops and "Resize" in ops
    assert all(len(n.output) == 1 for n in proto.graph.node if n.op_type == "MaxPool")


def test_unsupported_ops_flags_unpool_and_indices():
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 4, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1, 4, 4])
    nodes = [helper.make_node("MaxPool", ["x"], ["p", "idx"], name="pool1", kernel_shape=[2, 2], strides=[2, 2]),
             helper.make_node("MaxUnpool", ["p", "idx"], ["u"], name="unpool1", kernel_shape=[2, 2], strides=[2, 2]),
             helper.make_node("Relu", ["u"], ["y"], name="relu1")]
    model = helper.make_model(helper.make_graph(nodes, "g", [x], [y]))
    assert unsupported_ops(model) == [("MaxPool", "pool1"), ("MaxUnpool", "unpool1")]


def test_models_command_prints_table_and_rejects_unknown():
    from click.testing import CliRunner

    from regionkd.train.models.profile import models_command

    out = CliRunner().invoke(models_command, ["tinynet", "--size", "64", "64"])
    assert out.exit_code == 0, out.output
    n = count_params(create_model("tinynet"))
    assert f"| tinynet | {n / 1e6:.3f} M |" in out.output
    bad = CliRunner().invoke(models_command, ["nope"])
    assert bad.exit_code == 2 and "known models" in bad.output
