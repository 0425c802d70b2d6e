import math

import numpy as np
import pyarrow as pa
import pytest
import torch

from sfda_ray.config import ConfigError, SelectConfig, load_config
from sfda_ray.method.scoring import CONFIDENCE_BINS, class_confidence_histogram
from sfda_ray.method.selection import (
    class_balanced_thresholds,
    kept_counts,
    select,
    selection_quality,
    spearman,
)

C, B = 19, CONFIDENCE_BINS


def one_tau(**select: float | None) -> SelectConfig:
    """A selection whose pixel threshold is tau for every class (no class balancing)."""
    return SelectConfig(**select, class_balanced=False)


def hist_row(counts: dict[tuple[int, int], int]) -> list[int]:
    h = np.zeros((C, B), np.int64)
    for (k, b), n in counts.items():
        h[k, b] = n
    return h.ravel().tolist()


def scores_table(rows):
    return pa.table(
        {
            "image_id": [r[0] for r in rows],
            "score": pa.array([r[1] for r in rows], pa.float32()),
            "class_conf_hist": [r[2] for r in rows],
            "error": pa.array([None] * len(rows), pa.string()),
        }
    )


def test_histogram_bins_pixels_by_class_and_confidence():
    label = torch.tensor([[0, 0], [3, 18]], dtype=torch.uint8)
    conf = torch.tensor([[255, 0], [128, 12]], dtype=torch.uint8)
    h = class_confidence_histogram(label, conf, C).reshape(C, B)
    assert h.sum() == 4
    assert h[0, B - 1] == 1 and h[0, 0] == 1 and h[3, 10] == 1 and h[18, 0] == 1
    mask = torch.tensor([[True, False], [False, True]])
    assert class_confidence_histogram(label, conf, C, mask=mask).sum() == 2


def test_the_kept_pixels_of_the_priors_are_the_pixels_the_adaptation_keeps(tmp_path):
    """pi_V is counted from the histogram's bins; the adaptation's dataset keeps a pixel of
    confidence u8 >= 255 * tau, and masks the rest to 255. For any tau (rounded to a bin
    edge by select) and any confidence they agree pixel for pixel."""
    from data_fixtures import random_rgb, write_png

    from sfda_ray.data.adaptation import AdaptationDataset

    conf = torch.arange(256, dtype=torch.uint8).repeat(C, 1)  # every 8-bit value per class
    label = torch.arange(C, dtype=torch.uint8)[:, None].expand(C, 256).contiguous()
    hist = class_confidence_histogram(label, conf, C).reshape(C, B).numpy()
    row = {
        "image_path": str(write_png(tmp_path / "img.png", random_rgb(0, C, 256))),
        "pseudo_label_path": str(write_png(tmp_path / "label.png", label.numpy())),
        "confidence_path": str(write_png(tmp_path / "conf.png", conf.numpy())),
    }
    for tau in (0.8, 0.87, 0.9, 0.93, 0.95):
        sel = select(scores_table([("a", 0.5, hist.ravel().tolist())]), one_tau(ratio=1.0, tau=tau))
        thresholds = sel.class_thresholds
        assert thresholds[0] == pytest.approx(np.ceil(tau * B - 1e-9) / B)
        item = AdaptationDataset([row], (C, 256), thresholds, (1.0, 1.0), hflip=False)[0]
        kept = item["label"] != 255
        assert (item["label"][kept] == label.long()[kept]).all()  # kept pixels keep their class
        assert item["weight"].equal(conf.float() / 255.0)
        np.testing.assert_array_equal(kept_counts(hist, thresholds), kept.sum(1).numpy())
        assert 0 < kept.sum() < kept.numel()
    # Above the last bin's lower edge no bin would be kept, while the dataset would still
    # keep confidences of 255: such a tau is refused, by the config as well.
    with pytest.raises(ValueError, match=r"tau: 0.97 is out of range; allowed: 0 <= tau <= 0.95"):
        select(scores_table([("a", 0.5, hist.ravel().tolist())]), one_tau(ratio=1.0, tau=0.97))
    with pytest.raises(ConfigError, match="select.tau"):
        load_config(overrides={"select.tau": 0.97})


def test_ratio_and_threshold_split_images_by_score():
    rows = [
        ("a", 0.9, hist_row({(0, 19): 10})),
        ("b", 0.5, hist_row({(1, 19): 10})),
        ("c", 0.7, hist_row({(2, 10): 10})),
        ("d", 0.7, hist_row({(2, 19): 10})),
    ]
    table = scores_table(rows)
    sel = select(table, one_tau(ratio=0.5, tau=0.9))
    assert sel.virtual == ["a", "c"]  # tie between c and d broken by id
    assert sel.target == ["d", "b"]
    assert sel.score_cut == pytest.approx(0.7)
    by_threshold = select(table, one_tau(ratio=None, score_threshold=0.7, tau=0.9))
    assert by_threshold.virtual == ["a", "c", "d"]
    # pi_T counts every pixel; pi_V only kept pixels of V (c's are below tau).
    np.testing.assert_allclose(sel.prior_target[[0, 1, 2]], [0.25, 0.25, 0.5])
    np.testing.assert_allclose(sel.prior_virtual[[0, 2]], [1.0, 0.0])
    alpha = sel.class_weights(beta=1.0, clip=(0.5, 5.0))
    assert alpha[0] == pytest.approx(0.5)  # over-represented in V: clipped down
    assert alpha[2] == pytest.approx(5.0)  # absent from V's kept pixels: clipped up
    assert alpha[5] == 1.0  # absent everywhere
    # Under a softer beta an absent class still counts most, more than a scarce one.
    sel.prior_virtual[[0, 1, 2]] = [0.98, 0.02, 0.0]
    alpha = sel.class_weights(beta=0.5, clip=(0.5, 5.0))
    assert alpha[2] == pytest.approx(5.0) and alpha[1] == pytest.approx(12.5**0.5)
    assert sel.class_weights(beta=0.0, clip=(0.5, 5.0))[[0, 1, 2]].tolist() == [1.0] * 3
    with pytest.raises(ValueError, match="exactly one"):
        select(table, one_tau(ratio=0.5, score_threshold=0.5))
    with pytest.raises(ValueError, match="ratio: 1.5 is out of range"):
        select(table, one_tau(ratio=1.5))


def test_class_balanced_thresholds_keep_the_top_portion_of_each_class():
    hist = np.zeros((C, B), np.int64)
    hist[0, 19] = 100  # a confident class
    hist[1, [5, 8, 12, 14]] = 25  # an unsure class
    th = class_balanced_thresholds(hist, tau=0.9, portion=0.5)
    assert th[0] == pytest.approx(0.9)  # capped at tau
    assert th[1] == pytest.approx(12 / B)  # half of class 1 lies in bins 12 and 14
    assert th[2] == pytest.approx(0.9)  # absent class keeps tau
    kept = kept_counts(hist, th)
    assert kept[0] == 100 and kept[1] == 50


def test_selection_quality_and_rank_correlation():
    assert spearman(np.array([1.0, 2, 3]), np.array([10.0, 30, 20])) == pytest.approx(0.5)
    # Ties share their mean rank (as scipy.stats.spearmanr): not ordered by position.
    assert spearman(np.array([1.0, 1, 2]), np.array([1.0, 2, 3])) == pytest.approx(0.75**0.5)
    assert math.isnan(spearman(np.array([1.0, 1, 1]), np.array([1.0, 2, 3])))
    rows = [("a", 0.9, hist_row({(0, 19): 8, (0, 2): 2})), ("b", 0.4, hist_row({(1, 19): 10}))]
    # Of a's 8 confident pixels 2 are void (no label), of b's 10 pixels 5.
    labelled = [hist_row({(0, 19): 6, (0, 2): 2}), hist_row({(1, 19): 5})]
    correct = [hist_row({(0, 19): 6, (0, 2): 1}), hist_row({})]
    table = (
        scores_table(rows)
        .append_column("eval_correct_hist", pa.array(correct))
        .append_column("eval_labelled_hist", pa.array(labelled))
        .append_column("eval_miou", pa.array([80.0, 10.0], pa.float32()))
    )
    q = selection_quality(table, select(table, one_tau(ratio=0.5, tau=0.9)))
    assert q["kept_pixel_accuracy"] == pytest.approx(6 / 6)  # void pixels are not wrong
    assert q["kept_pixel_fraction"] == pytest.approx(8 / 10)
    assert q["all_pixel_accuracy"] == pytest.approx(7 / 13)
    assert q["score_miou_spearman"] == pytest.approx(1.0)
    # Scored before labelled pixels were counted: no accuracy rather than a wrong one.
    older = table.set_column(
        table.schema.get_field_index("eval_labelled_hist"),
        "eval_labelled_hist",
        pa.nulls(2, pa.list_(pa.int64())),
    )
    assert selection_quality(older, select(older, one_tau(ratio=0.5, tau=0.9))) == {}
