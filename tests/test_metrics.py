"""Confusion matrix and IoU against values worked out by hand."""

import math

import numpy as np
import pytest
import torch

from sfda_ray.metrics import confusion_matrix, iou_per_class, mean_iou, segmentation_report

# 4 classes; class 3 appears in neither target nor prediction; the last pixel is ignored
# (its prediction, 2, must not count).
TARGET = np.array([[0, 0, 1], [1, 2, 255]])
PRED = np.array([[0, 1, 1], [1, 0, 2]])
# rows = ground truth, columns = prediction
EXPECTED_CM = np.array(
    [
        [1, 1, 0, 0],  # gt 0: one right, one called 1
        [0, 2, 0, 0],  # gt 1: both right
        [1, 0, 0, 0],  # gt 2: called 0
        [0, 0, 0, 0],
    ]
)
# IoU = tp / (row + column - tp): 1/(2+2-1), 2/(2+3-2), 0/(1+0-0), absent
EXPECTED_IOU = [1 / 3, 2 / 3, 0.0, math.nan]


def test_confusion_matrix_numpy_and_torch():
    cm = confusion_matrix(PRED, TARGET, 4)
    assert cm.dtype == np.int64
    np.testing.assert_array_equal(cm, EXPECTED_CM)
    np.testing.assert_array_equal(
        confusion_matrix(torch.from_numpy(PRED), torch.from_numpy(TARGET).to(torch.uint8), 4),
        EXPECTED_CM,
    )


def test_confusion_matrix_takes_any_array_and_ignores_in_int64():
    flipped, read_only = PRED[:, ::-1], TARGET[:, ::-1].copy()
    read_only.flags.writeable = False  # as Ray hands arrays over
    np.testing.assert_array_equal(
        confusion_matrix(flipped, read_only, 4),
        confusion_matrix(PRED[:, ::-1].copy(), TARGET[:, ::-1].copy(), 4),
    )
    # A uint8 target with ignore_index -1: 255 is a value out of range, not ignored.
    with pytest.raises(ValueError, match="target has values outside"):
        confusion_matrix(torch.from_numpy(PRED), torch.from_numpy(TARGET).to(torch.uint8), 4, -1)


def test_confusion_matrix_rejects_bad_input():
    with pytest.raises(ValueError, match="shape"):
        confusion_matrix(PRED[:, :2], TARGET, 4)
    with pytest.raises(ValueError, match="target"):
        confusion_matrix(PRED, np.where(TARGET == 2, 7, TARGET), 4)
    with pytest.raises(ValueError, match="pred"):
        confusion_matrix(np.full_like(TARGET, 4), np.zeros_like(TARGET), 4)


def test_iou_and_mean_iou():
    np.testing.assert_allclose(iou_per_class(EXPECTED_CM), EXPECTED_IOU)
    assert mean_iou(EXPECTED_CM) == pytest.approx(100 / 3)  # nan class skipped
    assert mean_iou(EXPECTED_CM, [0, 1]) == pytest.approx(50.0)
    assert mean_iou(EXPECTED_CM, [1, 3]) == pytest.approx(200 / 3)
    assert math.isnan(mean_iou(EXPECTED_CM, [3]))


def test_segmentation_report():
    report = segmentation_report(
        EXPECTED_CM, ["road", "car", "sky", "bus"], {"two": [0, 1], "absent": [3]}
    )
    assert report["miou"] == pytest.approx(100 / 3)
    assert report["per_class"]["car"] == pytest.approx(200 / 3)
    assert report["per_class"]["sky"] == 0.0
    assert report["per_class"]["bus"] is None
    assert report["pixel_accuracy"] == pytest.approx(60.0)  # 3 of 5 counted pixels
    assert report["subsets"]["two"] == pytest.approx(50.0) and report["subsets"]["absent"] is None
    assert report["confusion_matrix"] == EXPECTED_CM.tolist()
    with pytest.raises(ValueError, match="class names"):
        segmentation_report(EXPECTED_CM, ["road"])
