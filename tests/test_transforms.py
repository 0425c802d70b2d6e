import numpy as np
import pytest
import torch

from sfda_ray.data.transforms import CAFFE_MEAN_BGR, build_transform, denormalize


def striped(h=60, w=80, stripe=10):
    """Vertical stripes whose red value encodes the class, so the label follows the image."""
    classes = (np.arange(w) // stripe) % 8
    label = np.tile(classes.astype(np.uint8), (h, 1))
    image = np.zeros((h, w, 3), np.uint8)
    image[..., 0] = label * 30 + 20
    image[..., 1] = np.arange(w, dtype=np.uint8)[None, :]  # breaks left/right symmetry
    return image, label


@pytest.mark.parametrize("normalization", ["imagenet", "caffe_bgr"])
def test_random_scale_crop_flip_keep_label_aligned(normalization):
    image, label = striped()
    t = build_transform(True, (60, 80), (0.5, 1.5), crop=(64, 96), normalization=normalization)
    torch.manual_seed(0)
    for _ in range(10):
        x, y = t(image, label)
        assert x.shape == (3, 64, 96) and x.dtype == torch.float32
        assert y.shape == (64, 96) and y.dtype == torch.int64
        rgb = denormalize(x, normalization)
        valid = y.numpy() != 255
        decoded = np.round((rgb[..., 0].astype(int) - 20) / 30)
        # Bilinear blending only touches stripe borders; a misaligned label would fail badly.
        assert (decoded[valid] == y.numpy()[valid]).mean() > 0.9
        assert set(np.unique(y.numpy())) <= set(range(8)) | {255}  # nearest: no new ids
        assert (rgb[~valid] == 0).all()  # padding: image 0 where the label is 255


def test_flip_flips_image_and_label_together():
    image, label = striped()
    label = label * 0 + np.arange(80, dtype=np.uint8)[None, :]  # column index
    t = build_transform(True, None, scale_range=(1.0, 1.0), hflip=True)
    torch.manual_seed(0)
    flipped = 0
    for _ in range(20):
        x, y = t(image, label)
        rgb = denormalize(x, "imagenet")
        if y[0, 0] == 79:
            flipped += 1
            np.testing.assert_array_equal(y.numpy(), label[:, ::-1])
            np.testing.assert_array_equal(rgb, image[:, ::-1])
        else:
            np.testing.assert_array_equal(y.numpy(), label)
            np.testing.assert_array_equal(rgb, image)
    assert 0 < flipped < 20


def test_eval_transform_resizes_label_with_nearest():
    image, label = striped()
    x, y = build_transform(False, (30, 40))(image, label)
    assert x.shape == (3, 30, 40) and y.shape == (30, 40)
    np.testing.assert_array_equal(y.numpy(), label[::2, ::2])
    x_only, none = build_transform(False, (30, 40))(image)
    assert none is None and torch.equal(x_only, x)


def test_caffe_bgr_known_pixel():
    image = np.array([[[10, 20, 30]]], np.uint8)  # R, G, B
    x, _ = build_transform(False, None, normalization="caffe_bgr")(image)
    expected = [30 - CAFFE_MEAN_BGR[0], 20 - CAFFE_MEAN_BGR[1], 10 - CAFFE_MEAN_BGR[2]]
    assert expected[0] == pytest.approx(-74.00698793)
    torch.testing.assert_close(x[:, 0, 0], torch.tensor(expected, dtype=torch.float32))


def test_imagenet_known_pixel():
    x, _ = build_transform(False, None)(np.array([[[255, 0, 0]]], np.uint8))
    expected = [(1 - 0.485) / 0.229, (0 - 0.456) / 0.224, (0 - 0.406) / 0.225]
    torch.testing.assert_close(x[:, 0, 0], torch.tensor(expected))


@pytest.mark.parametrize("normalization", ["imagenet", "caffe_bgr"])
def test_denormalize_inverts_normalization(normalization):
    image = np.random.default_rng(0).integers(0, 256, (7, 9, 3), dtype=np.uint8)
    x, _ = build_transform(False, None, normalization=normalization)(image)
    np.testing.assert_array_equal(denormalize(x, normalization), image)


def test_unknown_normalization_lists_allowed():
    with pytest.raises(ValueError, match="imagenet.*caffe_bgr"):
        build_transform(False, None, normalization="caffe")
