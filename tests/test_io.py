import cv2
import numpy as np
import pytest
from data_fixtures import (
    CITYSCAPES_TO_TRAIN,
    SYNTHIA_TO_TRAIN,
    all_ids_label,
    expected_train_ids,
    random_rgb,
    truncate,
    write_png,
    write_synthia_label,
)
from PIL import Image

from sfda_ray.data.io import BadInputError, image_size, load_image, load_label


def test_bad_input_error_carries_path_and_reason():
    e = BadInputError("/x/a.png", "empty file")
    assert isinstance(e, ValueError)
    assert (e.path, e.reason, str(e)) == ("/x/a.png", "empty file", "/x/a.png: empty file")


def test_gta5_and_cityscapes_labels_map_every_id(tmp_path):
    raw = all_ids_label(34)
    for name in ("gta5.png", "aachen_000000_000019_gtFine_labelIds.png"):
        path = write_png(tmp_path / name, raw)
        label = load_label(path, "cityscapes_ids")
        assert label.dtype == np.uint8 and label.shape == raw.shape
        np.testing.assert_array_equal(label, expected_train_ids(raw, CITYSCAPES_TO_TRAIN))


def test_palette_mode_gta5_label_uses_indices(tmp_path):
    raw = all_ids_label(34)
    img = Image.fromarray(raw, mode="L").convert("P")
    img.putpalette(np.random.default_rng(0).integers(0, 256, 768, dtype=np.uint8).tolist())
    img.save(tmp_path / "p.png")
    assert Image.open(tmp_path / "p.png").mode == "P"
    label = load_label(tmp_path / "p.png", "cityscapes_ids")
    np.testing.assert_array_equal(label, expected_train_ids(raw, CITYSCAPES_TO_TRAIN))


@pytest.mark.parametrize("channels", [3, 4])
def test_synthia_16bit_label_maps_every_id_from_first_channel(tmp_path, channels):
    raw = all_ids_label(23)
    path = write_synthia_label(tmp_path / "0000001.png", raw, channels)
    label = load_label(path, "synthia")
    np.testing.assert_array_equal(label, expected_train_ids(raw, SYNTHIA_TO_TRAIN))


def test_train_ids_label_passes_through(tmp_path):
    raw = np.array([[0, 18, 255, 7]], dtype=np.uint8)
    np.testing.assert_array_equal(load_label(write_png(tmp_path / "t.png", raw), "train_ids"), raw)


def test_unknown_cityscapes_ids_name_path_and_ids(tmp_path):
    raw = all_ids_label(34)
    raw[0, :2] = [40, 77]
    path = write_png(tmp_path / "bad.png", raw)
    with pytest.raises(BadInputError) as info:
        load_label(path, "cityscapes_ids")
    assert info.value.path == str(path)
    assert "unknown label ids [40, 77] for format cityscapes_ids (valid 0..33)" in str(info.value)


def test_unknown_synthia_ids_beyond_8_bits(tmp_path):
    raw = all_ids_label(23).astype(np.uint16)
    raw[0, 0] = 300  # would alias to id 44 if the 16-bit value were truncated
    path = write_synthia_label(tmp_path / "bad.png", raw)
    with pytest.raises(BadInputError, match=r"unknown label ids \[300\] for format synthia"):
        load_label(path, "synthia")


def test_unknown_train_id(tmp_path):
    path = write_png(tmp_path / "t.png", np.array([[0, 19]], dtype=np.uint8))
    with pytest.raises(BadInputError, match=r"\[19\].*valid 0..18, 255"):
        load_label(path, "train_ids")


def test_multichannel_cityscapes_label_is_rejected(tmp_path):
    path = write_png(tmp_path / "color.png", random_rgb(0))
    with pytest.raises(BadInputError, match="single-channel 8-bit PNG, got mode RGB"):
        load_label(path, "cityscapes_ids")


def test_single_channel_synthia_label_is_rejected(tmp_path):
    path = write_png(tmp_path / "grey.png", all_ids_label(23))
    with pytest.raises(BadInputError, match="3 or 4 channels, got 1"):
        load_label(path, "synthia")


def test_rgb_image_round_trip_and_uri(tmp_path):
    rgb = random_rgb(1)
    path = write_png(tmp_path / "a.png", rgb)
    np.testing.assert_array_equal(load_image(path), rgb)
    np.testing.assert_array_equal(load_image(path.as_uri()), rgb)


def test_other_modes_become_rgb(tmp_path):
    grey = np.array([[0, 100, 255]], dtype=np.uint8)
    write_png(tmp_path / "l.png", grey)
    np.testing.assert_array_equal(load_image(tmp_path / "l.png"), np.repeat(grey[..., None], 3, 2))

    rgba = np.dstack([random_rgb(2), np.full((16, 32), 7, np.uint8)])
    write_png(tmp_path / "rgba.png", rgba)
    np.testing.assert_array_equal(load_image(tmp_path / "rgba.png"), rgba[..., :3])

    # C, M, Y, K = 0 is white; full M + Y is red.
    cmyk = Image.fromarray(np.array([[[0, 0, 0, 0], [0, 255, 255, 0]]], np.uint8), mode="CMYK")
    cmyk.save(tmp_path / "cmyk.tif")
    out = load_image(tmp_path / "cmyk.tif")
    assert out.shape == (1, 2, 3) and out.dtype == np.uint8
    assert out.tolist() == [[[255, 255, 255], [255, 0, 0]]]


def test_16bit_grey_is_scaled_to_8bit(tmp_path):
    grey16 = np.array([[0, 100 * 256 + 200, 65535]], dtype=np.uint16)
    assert cv2.imwrite(str(tmp_path / "g16.png"), grey16)
    out = load_image(tmp_path / "g16.png")
    assert out.dtype == np.uint8 and out.shape == (1, 3, 3)
    assert out[0, :, 0].tolist() == [0, 100, 255]
    assert (out == out[..., :1]).all()


def _bad_files(tmp_path):
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "text.png").write_text("not an image at all\n")
    trunc = write_png(tmp_path / "trunc.png", random_rgb(3, 64, 64))
    truncate(trunc, keep=trunc.stat().st_size // 2)  # header intact, pixel data cut
    return {
        "missing.png": "file not found",
        "empty.png": "empty file",
        "text.png": "not an image",
        "trunc.png": "truncated",
    }


def test_bad_images_raise_bad_input_error_naming_path(tmp_path):
    for name, reason in _bad_files(tmp_path).items():
        with pytest.raises(BadInputError, match=reason) as info:
            load_image(tmp_path / name)
        assert info.value.path == str(tmp_path / name)
        assert str(info.value).startswith(str(tmp_path / name))


def test_bad_label_files_raise_for_every_format(tmp_path):
    _bad_files(tmp_path)
    trunc = write_synthia_label(tmp_path / "trunc16.png", all_ids_label(23, 64, 64))
    truncate(trunc, keep=trunc.stat().st_size // 2)
    for fmt, names in {
        "cityscapes_ids": ["missing.png", "empty.png", "text.png", "trunc.png"],
        "synthia": ["missing.png", "empty.png", "text.png", "trunc16.png"],
    }.items():
        for name in names:
            with pytest.raises(BadInputError) as info:
                load_label(tmp_path / name, fmt)
            assert info.value.path == str(tmp_path / name)


def test_image_size_reads_headers(tmp_path):
    write_png(tmp_path / "a.png", random_rgb(0, 5, 7))
    Image.fromarray(random_rgb(0, 9, 4)).save(tmp_path / "b.jpg")
    write_synthia_label(tmp_path / "s.png", all_ids_label(23, 6, 11))
    assert image_size(tmp_path / "a.png") == (5, 7)
    assert image_size(tmp_path / "b.jpg") == (9, 4)
    assert image_size(tmp_path / "s.png") == (6, 11)
    (tmp_path / "text.png").write_text("hello")
    for name in ("text.png", "missing.png"):
        with pytest.raises(BadInputError, match=name):
            image_size(tmp_path / name)


def test_a_path_the_filesystem_cannot_parse_is_one_bad_file():
    """An object key with "?" reads as URI options: that file is skipped, not the scan."""
    path = "s3://sfda-test-bucket/images/frame?1.png"
    for read in (image_size, load_image):
        with pytest.raises(BadInputError, match="unusable path") as info:
            read(path)
        assert info.value.path == path
