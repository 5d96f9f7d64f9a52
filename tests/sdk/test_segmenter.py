"""Segmenter: hand-computed masks, orientation invariance, geometry of the output, post-processing."""
from __future__ import annotations

import threading
import tracemalloc

import nibabel as nib
import numpy as np
import pytest
from tests.helpers import EXACT_SHAPE, build_tiny_bundle, expected_labels_from_hu, make_phantom
from nibabel import orientations as nio

from regionkd.sdk.errors import InputError
from regionkd.sdk.postprocess import keep_largest_components
from regionkd.sdk.segmenter import Segmenter

RAS = nio.axcodes2ornt("RAS")
# how datasets store volumes: LiTS (x, y flipped), KiTS19 (slice axis first, all flipped), other flips
LAYOUTS = {"lits": ("L", "P", "S"), "kits19": ("I", "P", "L"), "flipped": ("R", "A", "I"), "permuted": ("A", "S", "R")}


def ras_image(hu, affine):
    img = nib.Nifti1Image(hu, affine)
    img.header.set_qform(affine, code=1)
    img.header.set_sform(affine, code=1)
    return img


def stored_as(img, axcodes):
    return img.as_reoriented(nio.ornt_transform(RAS, nio.axcodes2ornt(axcodes)))


def to_ras(img):
    return np.asarray(nib.as_closest_canonical(img).dataobj)


def test_mask_is_the_hand_computed_threshold_without_resize(exact_bundle):
    hu, affine = make_phantom(shape=EXACT_SHAPE, with_distractor=False)
    with Segmenter(exact_bundle, backend="onnxruntime", largest_component=False) as seg:
        mask = np.asarray(seg.segment(ras_image(hu, affine)).mask.dataobj)
    expected = expected_labels_from_hu(hu)
    assert np.array_equal(mask, expected)
    assert set(np.unique(expected)) == {0, 1, 2}  # the phantom exercises every class


def test_largest_component_removes_the_distractor_blob(exact_bundle):
    hu, affine = make_phantom(shape=EXACT_SHAPE, with_distractor=True)
    clean, _ = make_phantom(shape=EXACT_SHAPE, with_distractor=False)
    with Segmenter(exact_bundle, backend="onnxruntime") as seg:
        mask = np.asarray(seg.segment(ras_image(hu, affine)).mask.dataobj)
    with Segmenter(exact_bundle, backend="onnxruntime", largest_component=False) as seg:
        raw = np.asarray(seg.segment(ras_image(hu, affine)).mask.dataobj)
    assert (raw == 1).sum() > (mask == 1).sum()            # the blob was there before
    assert np.array_equal(mask, expected_labels_from_hu(clean))


def test_keep_largest_components_handles_tumour_inside_and_outside():
    lab = np.zeros((10, 10, 3), dtype=np.uint8)
    lab[1:6, 1:6, :] = 1          # organ, 75 voxels
    lab[3, 3, 1] = 2              # tumour inside the organ: kept
    lab[8, 8, :] = 1              # separate organ fragment: removed
    lab[8, 1, 1] = 2              # tumour far from the organ: removed
    lab[6, 1:6, :] = 2            # tumour on the organ's edge (touching): kept
    out = keep_largest_components(lab, [1], 3)
    expected = lab.copy()
    expected[8, 8, :] = 0
    expected[8, 1, 1] = 0
    assert np.array_equal(out, expected)
    assert np.array_equal(keep_largest_components(lab, [], 3), lab)


def test_two_kidneys_keep_two_components_but_not_a_stray_blob():
    lab = np.zeros((20, 10, 4), dtype=np.uint8)
    lab[1:6, 1:6, :] = 1          # right kidney, 100 voxels
    lab[12:16, 1:5, :] = 1        # left kidney, 64 voxels
    lab[13, 2, 1] = 2             # a tumour in the smaller kidney
    lab[18, 8, 2] = 1             # a stray blob of 1 voxel (< 10% of the largest)
    two = keep_largest_components(lab, {1: 2}, 3)
    expected = lab.copy()
    expected[18, 8, 2] = 0
    assert np.array_equal(two, expected)
    one = keep_largest_components(lab, {"1": 1}, 3)      # JSON-style keys; one component: the right kidney only
    assert (one[12:16] == 0).all() and (one[1:6, 1:6] == lab[1:6, 1:6]).all()
    assert np.array_equal(keep_largest_components(lab, [1], 3), one)


def test_organ_labels_from_the_manifest_or_the_class_names():
    from regionkd.sdk.segmenter import organ_labels_of

    assert organ_labels_of({}, ["background", "kidney", "tumour"]) == {1: 2}
    assert organ_labels_of({}, ["background", "liver", "tumour"]) == {1: 1}
    assert organ_labels_of({"largest_component_labels": [1], "largest_component_counts": {"1": 2}},
                           ["background", "organ", "lesion"]) == {1: 2}
    assert organ_labels_of({"largest_component_labels": []}, ["background", "kidney", "tumour"]) == {}


def test_foreground_box_and_components_do_not_depend_on_memory_layout():
    from scipy import ndimage

    from regionkd.sdk.postprocess import foreground_box

    rng = np.random.default_rng(5)
    lab = np.zeros((40, 30, 20), dtype=np.uint8)
    lab[5:20, 4:15, 3:12] = 1                      # the organ
    lab[25:28, 20:24, 14:18] = 1                   # a smaller, separate organ blob: removed
    lab[8:11, 6:9, 5:8] = 2                        # tumour inside the organ: kept
    lab[33:35, 2:4, 1:3] = 2                       # tumour outside it: removed
    assert foreground_box(lab) == ndimage.find_objects((lab > 0).astype(np.uint8))[0]
    assert foreground_box(np.zeros((4, 4, 4), np.uint8)) is None
    noise = (rng.random(lab.shape) < 0.01).astype(np.uint8)
    assert foreground_box(noise) == ndimage.find_objects(noise)[0]
    expected = lab.copy()
    expected[25:28, 20:24, 14:18] = 0
    expected[33:35, 2:4, 1:3] = 0
    for stored in (lab, np.asfortranarray(lab), np.moveaxis(np.ascontiguousarray(np.moveaxis(lab, 2, 0)), 0, 2)):
        out = keep_largest_components(stored, [1], 3)
        assert np.array_equal(out, expected) and np.array_equal(stored, lab)       # input untouched


@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8"])
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_same_mask_in_physical_space_whatever_the_storage(tiny_bundle, layout, precision):
    hu, affine = make_phantom()
    reference_img = ras_image(hu, affine)
    with Segmenter(tiny_bundle, backend="onnxruntime", precision=precision) as seg:
        reference = np.asarray(seg.segment(reference_img).mask.dataobj)
        stored = stored_as(reference_img, LAYOUTS[layout])
        assert nib.aff2axcodes(stored.affine) == LAYOUTS[layout]
        result = seg.segment(stored)
    mask = result.mask
    assert mask.shape == stored.shape
    assert mask.get_data_dtype() == np.uint8 and np.asarray(mask.dataobj).dtype == np.uint8
    assert np.array_equal(mask.affine, stored.affine)
    assert np.array_equal(to_ras(mask), reference)
    assert (reference == 1).sum() > 500 and (reference == 2).sum() > 20


def test_segment_file_keeps_affine_codes_and_names_classes(tiny_bundle, phantom_nifti, tmp_path):
    src = nib.load(phantom_nifti)
    kits = stored_as(src, LAYOUTS["kits19"])
    kits.header.set_qform(kits.affine, code=1)
    kits.header.set_sform(kits.affine, code=2)
    in_path, out_path = tmp_path / "kits.nii.gz", tmp_path / "out" / "mask.nii.gz"
    nib.save(kits, str(in_path))
    with Segmenter(tiny_bundle, backend="onnxruntime") as seg:
        result = seg.segment_file(in_path, out_path)
        assert seg.model_size_bytes == (tiny_bundle / "model.fp32.onnx").stat().st_size
    written, original = nib.load(str(out_path)), nib.load(str(in_path))
    assert np.array_equal(written.affine, original.affine)
    assert written.header.get_qform(coded=True)[1] == 1 and written.header.get_sform(coded=True)[1] == 2
    assert written.get_data_dtype() == np.uint8
    assert "1=liver 2=tumour" in written.header["descrip"].item().decode()
    assert written.header.get_intent()[0] == "label"
    assert np.array_equal(np.asarray(written.dataobj), np.asarray(result.mask.dataobj))
    t = result.timings
    assert set(t) >= {"load", "preprocess", "inference", "postprocess", "write", "total"}
    assert all(t[s] > 0 for s in ("load", "preprocess", "inference", "postprocess", "write"))
    assert t["total"] == pytest.approx(sum(t[s] for s in ("load", "preprocess", "inference", "postprocess", "write")))
    assert t["slices"] == 12


def test_precisions_and_batch_sizes_agree(tiny_bundle):
    hu, affine = make_phantom()
    img = ras_image(hu, affine)
    masks = {}
    for precision, batch in [("fp32", None), ("fp32", 1), ("fp32", 5), ("fp16", None), ("int8", None)]:
        with Segmenter(tiny_bundle, backend="onnxruntime", precision=precision, batch_size=batch) as seg:
            masks[(precision, batch)] = np.asarray(seg.segment(img).mask.dataobj)
    ref = masks[("fp32", None)]
    assert np.array_equal(masks[("fp32", 1)], ref) and np.array_equal(masks[("fp32", 5)], ref)
    assert np.mean(masks[("fp16", None)] == ref) > 0.99
    assert np.mean(masks[("int8", None)] == ref) > 0.99


def test_fixed_batch_model_is_padded(tmp_path):
    bundle = build_tiny_bundle(tmp_path / "b1", precisions=("fp32",), fixed_batch=2)
    hu, affine = make_phantom(shape=(20, 18, 5), with_distractor=False)
    with Segmenter(bundle, backend="onnxruntime") as seg:
        assert seg.backend.max_batch == 2
        mask = np.asarray(seg.segment(ras_image(hu, affine)).mask.dataobj)
    assert mask.shape == (20, 18, 5) and (mask == 1).any()


def test_one_segmenter_serves_several_threads(tiny_bundle):
    hu, affine = make_phantom()
    images = [ras_image(hu, affine), stored_as(ras_image(hu, affine), LAYOUTS["lits"])]
    with Segmenter(tiny_bundle, backend="onnxruntime") as seg:
        expected = [to_ras(seg.segment(img).mask) for img in images]
        results, errors = {}, []

        def work(i):
            try:
                results[i] = to_ras(seg.segment(images[i % 2]).mask)
            except Exception as exc:  # pragma: no cover - reported below
                errors.append(exc)

        threads = [threading.Thread(target=work, args=(i,)) for i in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert not errors
    assert all(np.array_equal(results[i], expected[i % 2]) for i in range(6))


def test_memory_stays_flat_over_many_volumes(tiny_bundle):
    hu, affine = make_phantom()
    img = ras_image(hu, affine)
    with Segmenter(tiny_bundle, backend="onnxruntime") as seg:
        for _ in range(3):
            seg.segment(img)
        tracemalloc.start()
        try:
            seg.segment(img)
            after_few = tracemalloc.get_traced_memory()[0]
            for _ in range(40):
                seg.segment(img)
            after_many = tracemalloc.get_traced_memory()[0]
        finally:
            tracemalloc.stop()
    assert after_many - after_few < 200_000   # one mask is 17 kB; 40 leaked would be 700 kB


@pytest.mark.parametrize("make, message", [
    (lambda hu, a: nib.Nifti1Image(hu[:, :, 0], a), "3D"),
    (lambda hu, a: nib.Nifti1Image(np.stack([hu, hu], axis=-1), a), "4D"),
    (lambda hu, a: nib.Nifti1Image(np.where(hu > 50, np.nan, hu).astype(np.float32), a), "NaN"),
    (lambda hu, a: nib.Nifti1Image(np.where(hu > 50, np.inf, hu).astype(np.float32), a), "infinite"),
    (lambda hu, a: hu, "a numpy array needs its affine"),
    (lambda hu, a: hu.tolist(), "expected a nibabel image or a numpy array"),
])
def test_bad_in_memory_images_are_refused(tiny_bundle, make, message):
    hu, affine = make_phantom(shape=(16, 16, 4), with_distractor=False)
    with Segmenter(tiny_bundle, backend="onnxruntime") as seg:
        with pytest.raises(InputError, match=message):
            seg.segment(make(hu, affine), name="scan-7")


def test_trailing_singleton_axis_is_accepted(tiny_bundle):
    hu, affine = make_phantom(shape=(16, 16, 4), with_distractor=False)
    with Segmenter(tiny_bundle, backend="onnxruntime") as seg:
        mask3 = np.asarray(seg.segment(nib.Nifti1Image(hu, affine)).mask.dataobj)
        mask4 = np.asarray(seg.segment(nib.Nifti1Image(hu[..., None], affine)).mask.dataobj)
    assert np.array_equal(mask3, mask4)


def test_segment_file_refuses_to_overwrite_its_input(tiny_bundle, phantom_nifti):
    before = phantom_nifti.read_bytes()
    with Segmenter(tiny_bundle, backend="onnxruntime") as seg:
        with pytest.raises(InputError, match="is the input"):
            seg.segment_file(phantom_nifti, phantom_nifti)
        with pytest.raises(InputError, match=r"\.nii or \.nii\.gz"):
            seg.segment_file(phantom_nifti, phantom_nifti.with_name("mask.png"))
    assert phantom_nifti.read_bytes() == before


def _sensitive_bundle(root):
    """A bundle whose model turns a 1-ulp change of its input into another label: logits
    (sin(1e6 x), cos(1e6 x), -2). Any preprocessing that depends on memory layout shows up in its masks."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from regionkd.sdk.bundle import file_entry, write_manifest

    root.mkdir(parents=True)
    inp = helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 1, 32, 32])
    out = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 3, 32, 32])
    inits = [numpy_helper.from_array(np.float32(1e6), "k"), numpy_helper.from_array(np.float32(0.0), "zero"),
             numpy_helper.from_array(np.float32(-2.0), "low")]
    nodes = [helper.make_node("Mul", ["image", "k"], ["kx"]), helper.make_node("Sin", ["kx"], ["s"]),
             helper.make_node("Cos", ["kx"], ["c"]), helper.make_node("Mul", ["image", "zero"], ["z0"]),
             helper.make_node("Add", ["z0", "low"], ["l"]),
             helper.make_node("Concat", ["s", "c", "l"], ["logits"], axis=1)]
    model = helper.make_model(helper.make_graph(nodes, "sensitive", [inp], [out], initializer=inits),
                              opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(root / "model.fp32.onnx"))
    write_manifest(root, {
        "format_version": 1, "model": {"name": "sensitive", "class_names": ["background", "a", "b"]},
        "preprocessing": {"window": [-60, 140], "input_size": [32, 32]}, "io": {"max_batch": 4},
        "files": [file_entry(root / "model.fp32.onnx", root, format="onnx", precision="fp32",
                             backends=["onnxruntime"])]})
    return root


def test_a_layout_sensitive_model_gives_the_same_mask_for_every_storage(tmp_path):
    # 48 axis orders/flips, each in C and Fortran order; square slices resized to a square network
    # size, where the pass order once depended on the strides (and int8 masks changed in 335 voxels)
    import itertools

    _, affine = make_phantom(shape=(48, 48, 6))
    hu = np.random.default_rng(1).normal(40, 50, (48, 48, 6)).astype(np.float32)   # soft tissue and noise
    reference_img = ras_image(hu, affine)
    with Segmenter(_sensitive_bundle(tmp_path / "s.bundle"), backend="onnxruntime", largest_component=False) as seg:
        reference = np.asarray(seg.segment(reference_img).mask.dataobj)
        assert 0.2 < (reference == 1).mean() < 0.8                  # the model really is chaotic
        for axcodes in itertools.product(*(("R", "L"), ("A", "P"), ("S", "I"))):
            for perm in itertools.permutations(range(3)):
                codes = tuple(axcodes[i] for i in perm)
                stored = stored_as(reference_img, codes)
                for order in ("C", "F"):
                    data = np.array(np.asarray(stored.dataobj), order=order)
                    mask = seg.segment(nib.Nifti1Image(data, stored.affine, stored.header)).mask
                    assert np.array_equal(to_ras(mask), reference), (codes, order)


def test_a_numpy_array_with_its_affine_is_segmented_like_the_nibabel_image(tiny_bundle):
    hu, affine = make_phantom()
    with Segmenter(tiny_bundle, backend="onnxruntime") as seg:
        from_image = seg.segment(nib.Nifti1Image(hu, affine))
        from_array = seg.segment(hu, affine=affine)
        with pytest.raises(InputError, match="give an affine only with a numpy array"):
            seg.segment(nib.Nifti1Image(hu, affine), affine=affine)
        with pytest.raises(InputError, match="the affine must be 4x4"):
            seg.segment(hu, affine=np.eye(3))
    assert np.array_equal(np.asarray(from_image.mask.dataobj), np.asarray(from_array.mask.dataobj))
    assert np.array_equal(from_array.mask.affine, affine) and from_array.statistics is None


@pytest.mark.parametrize("seed", range(4))
def test_cc3d_and_scipy_label_the_same_components_and_keep_the_same_voxels(seed):
    """The largest-component step uses cc3d for speed; scipy.ndimage is the reference it must equal,
    label for label (both number components in raster order), on masks with many small blobs."""
    from regionkd.sdk.postprocess import label_components

    rng = np.random.default_rng(seed)
    lab = np.zeros((40, 36, 12), np.uint8)
    lab[5:30, 4:28, 2:10] = 1
    lab[12:18, 10:16, 4:7] = 2                                  # tumour inside
    lab[rng.random(lab.shape) < 0.03] = 1                       # organ-coloured specks
    lab[rng.random(lab.shape) < 0.01] = 2                       # lesion specks
    mask = lab > 0
    a, na = label_components(mask, "scipy")
    b, nb = label_components(mask, "cc3d")
    assert na == nb > 10 and np.array_equal(a, b.astype(a.dtype))
    for organs in ([1], {1: 2}):
        ref = keep_largest_components(lab, organs, 3, labeller="scipy")
        assert not np.array_equal(ref, lab)                     # the step did remove specks
        assert np.array_equal(keep_largest_components(lab, organs, 3, labeller="cc3d"), ref)
