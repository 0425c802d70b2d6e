import numpy as np
import pytest
from data_fixtures import CITYSCAPES_TO_TRAIN, SYNTHIA_TO_TRAIN

from sfda_ray.data.labels import (
    CLASS_NAMES,
    EVAL_SUBSETS,
    IGNORE_INDEX,
    NUM_CLASSES,
    PALETTE,
    VALID_IDS,
    colorize,
    describe_valid,
    label_lut,
)


def test_class_names_in_train_id_order():
    assert CLASS_NAMES == (
        "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light",
        "traffic sign", "vegetation", "terrain", "sky", "person", "rider", "car", "truck",
        "bus", "train", "motorcycle", "bicycle",
    )  # fmt: skip
    assert NUM_CLASSES == len(CLASS_NAMES) == 19
    assert IGNORE_INDEX == 255


def test_palette_matches_official_colours():
    assert PALETTE.shape == (19, 3) and PALETTE.dtype == np.uint8
    assert PALETTE[0].tolist() == [128, 64, 128]  # road
    assert PALETTE[10].tolist() == [70, 130, 180]  # sky
    assert PALETTE[18].tolist() == [119, 11, 32]  # bicycle


@pytest.mark.parametrize(
    "label_format, table, valid",
    [
        ("cityscapes_ids", CITYSCAPES_TO_TRAIN, range(34)),
        ("synthia", SYNTHIA_TO_TRAIN, range(23)),
        ("train_ids", {i: i for i in range(19)}, [*range(19), 255]),
    ],
)
def test_every_valid_raw_id_maps_to_expected_train_id(label_format, table, valid):
    lut = label_lut(label_format)
    assert lut.dtype == np.uint8 and lut.shape == (256,)
    assert VALID_IDS[label_format] == set(valid)
    for raw in valid:
        assert lut[raw] == table.get(raw, 255), (label_format, raw)


def test_synthia_mapping_covers_all_classes_but_terrain_truck_train():
    mapped = set(label_lut("synthia")[:23].tolist()) - {255}
    assert mapped == set(range(19)) - {9, 14, 16}


def test_eval_subsets():
    assert EVAL_SUBSETS["cityscapes19"] == tuple(range(19))
    s16, s13 = EVAL_SUBSETS["synthia16"], EVAL_SUBSETS["synthia13"]
    assert len(s16) == 16 and len(s13) == 13
    assert {CLASS_NAMES[c] for c in set(range(19)) - set(s16)} == {"terrain", "truck", "train"}
    assert {CLASS_NAMES[c] for c in set(s16) - set(s13)} == {"wall", "fence", "pole"}


def test_describe_valid():
    assert describe_valid("cityscapes_ids") == "0..33"
    assert describe_valid("train_ids") == "0..18, 255"


def test_unknown_format_is_rejected():
    with pytest.raises(ValueError, match="cityscapes_ids"):
        label_lut("gta")


def test_colorize():
    label = np.array([[0, 10], [255, 18]], dtype=np.uint8)
    rgb = colorize(label)
    assert rgb.shape == (2, 2, 3) and rgb.dtype == np.uint8
    assert rgb[0, 0].tolist() == PALETTE[0].tolist()
    assert rgb[0, 1].tolist() == PALETTE[10].tolist()
    assert rgb[1, 0].tolist() == [0, 0, 0]
