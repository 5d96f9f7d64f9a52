"""The slice pre/post-processing shared by training and the runtime."""
import numpy as np
import pytest
from scipy.ndimage import gaussian_filter

from regionkd.sdk.errors import InputError
from regionkd.sdk.preprocess import (
    linear_resize_matrix, logits_to_labels, resize_labels_nearest, resize_slices, window_and_scale,
)


def test_window_and_scale_maps_window_to_unit_range():
    hu = np.array([-1000.0, -60.0, 40.0, 140.0, 2000.0])
    np.testing.assert_allclose(window_and_scale(hu, (-60, 140)), [-1.0, -1.0, 0.0, 1.0, 1.0])
    with pytest.raises(InputError, match="hi > lo"):
        window_and_scale(hu, (10, 10))


@pytest.mark.parametrize("size", [(64, 64), (20, 30), (37, 51), (100, 13)])
def test_resize_matches_torch_bilinear(size):
    torch = pytest.importorskip("torch")
    x = np.random.default_rng(0).normal(size=(2, 3, 37, 51)).astype(np.float32)
    ref = torch.nn.functional.interpolate(torch.from_numpy(x), size=size, mode="bilinear", align_corners=False)
    np.testing.assert_allclose(resize_slices(x, size), ref.numpy(), atol=2e-5)


@pytest.mark.parametrize("size", [(16, 16), (32, 8), (20, 30), (96, 96)])
def test_resize_of_slices_stored_x_fastest_and_at_integer_factors(size):
    # NIfTI volumes give slices whose first in-plane axis is the contiguous one; 64 -> 16 and 64 -> 32
    # are integer factors (strided views instead of gathers): same numbers as a C-ordered copy
    torch = pytest.importorskip("torch")
    c = np.random.default_rng(2).normal(size=(5, 64, 64)).astype(np.float32)
    f = np.asfortranarray(c.transpose(1, 2, 0)).transpose(2, 0, 1)          # (z, x, y) view, x fastest
    assert f.strides[1] < f.strides[2] and np.array_equal(f, c)
    ref = torch.nn.functional.interpolate(torch.from_numpy(c)[:, None], size=size, mode="bilinear",
                                          align_corners=False)[:, 0].numpy()
    out = resize_slices(f, size)
    assert out.flags["C_CONTIGUOUS"] and out.shape == (5, *size)
    np.testing.assert_allclose(out, ref, atol=2e-5)
    np.testing.assert_allclose(resize_slices(c, size), ref, atol=2e-5)


def test_resize_matches_the_dense_interpolation_matrices():
    x = np.random.default_rng(1).normal(size=(3, 40, 24)).astype(np.float32)
    a, b = linear_resize_matrix(40, 17), linear_resize_matrix(24, 50)
    np.testing.assert_allclose(resize_slices(x, (17, 50)), a @ x @ b.T, atol=1e-5)


def test_resize_two_pixels_by_hand():
    # half-pixel centres: upsampling [0, 4] to 4 samples gives [0, 1, 3, 4]
    x = np.array([[[0.0, 4.0]]], dtype=np.float32)
    np.testing.assert_allclose(resize_slices(x, (1, 4))[0, 0], [0, 1, 3, 4])


def test_nearest_label_resize_keeps_label_values():
    lab = np.arange(16, dtype=np.uint8).reshape(1, 4, 4)
    out = resize_labels_nearest(lab, (8, 8))
    assert out.shape == (1, 8, 8) and set(np.unique(out)) == set(range(16))
    assert out[0, 0, 0] == 0 and out[0, 7, 7] == 15 and out[0, 2, 0] == 4


@pytest.mark.parametrize("shape_in,shape_out", [((32, 32), (80, 70)), ((64, 48), (40, 100)), ((16, 16), (16, 16))])
def test_logits_to_labels_is_exactly_argmax_of_resized_logits(shape_in, shape_out):
    rng = np.random.default_rng(2)
    logits = gaussian_filter(rng.normal(size=(4, 3, *shape_in)), (0, 0, 2, 2)).astype(np.float32)
    dense = np.einsum("xh,nchw,yw->ncxy", linear_resize_matrix(shape_in[0], shape_out[0]).astype(np.float64),
                      logits.astype(np.float64), linear_resize_matrix(shape_in[1], shape_out[1]).astype(np.float64))
    fast = logits_to_labels(logits, shape_out)
    assert fast.dtype == np.uint8 and fast.shape == (4, *shape_out)
    top2 = np.sort(dense, axis=1)[:, -2:]
    clear = (top2[:, 1] - top2[:, 0]) > 1e-5        # away from float ties the answer is unique
    assert clear.mean() > 0.99
    np.testing.assert_array_equal(fast[clear], dense.argmax(axis=1)[clear])


def test_logits_to_labels_outside_the_foreground_box_and_on_empty_slices():
    rng = np.random.default_rng(3)
    logits = np.zeros((3, 3, 32, 40), np.float32)
    logits[:, 0] = 2.0
    logits[0, 1, 10:18, 12:20] = 4.0 + rng.normal(size=(8, 8))       # an organ blob in slice 0
    logits[0, 2, 13:15, 15:17] = 9.0                                  # a lesion inside it
    logits[1, 2, 30:32, 0:3] = 5.0                                    # a lesion at the image border
    # slice 2: background only
    dense = np.einsum("xh,nchw,yw->ncxy", linear_resize_matrix(32, 77).astype(np.float64),
                      logits.astype(np.float64), linear_resize_matrix(40, 90).astype(np.float64))
    fast = logits_to_labels(logits, (77, 90))
    np.testing.assert_array_equal(fast, dense.argmax(axis=1))
    assert (fast[2] == 0).all() and (fast[0] == 2).any() and (fast[1] == 2).any()


def _layouts(volume):
    """The same logical (x, y, z) array stored in every axis order, with every flip, in C and Fortran order."""
    import itertools

    for perm in itertools.permutations(range(3)):
        for flips in itertools.product((False, True), repeat=3):
            stored = volume
            for axis, flip in enumerate(flips):
                if flip:
                    stored = np.flip(stored, axis)
            stored = np.transpose(stored, perm)
            for order in ("C", "F"):
                kept = np.array(stored, order=order)                    # what a file holds, in memory
                view = np.transpose(kept, np.argsort(perm))             # back to the logical order, as a view
                for axis, flip in enumerate(flips):
                    if flip:
                        view = np.flip(view, axis)
                yield f"{perm}{flips}{order}", view


@pytest.mark.parametrize("shape, size", [((48, 48, 5), (32, 32)), ((64, 64, 3), (64, 32)), ((40, 36, 4), (32, 32)),
                                         ((30, 30, 3), (96, 96))])
def test_network_input_is_bit_identical_for_every_memory_layout(shape, size):
    # a square slice to a square size is the common CT case (512 -> 256) and was the one that differed
    from regionkd.sdk.preprocess import preprocess_slices, volume_to_slices

    hu = np.random.default_rng(7).normal(40, 300, shape).astype(np.float32)
    reference = preprocess_slices(volume_to_slices(np.ascontiguousarray(hu)), (-60, 140), size)
    for name, view in _layouts(hu):
        assert np.array_equal(view, hu)
        out = preprocess_slices(volume_to_slices(view), (-60, 140), size)
        assert out.tobytes() == reference.tobytes(), name
