"""Virtual-source selection and class priors: a pure function of a scores table.

Score once, select many: every threshold here is applied to the per-image numbers and
per-(class, confidence bin) pixel counts already in the table, so no model runs again.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from sfda_ray.method.scoring import CONFIDENCE_BINS

if TYPE_CHECKING:
    from sfda_ray.config import SelectConfig


@dataclass
class Selection:
    virtual: list[str]  # image ids of the virtual source V (most confident first)
    target: list[str]  # the remaining target images T
    class_thresholds: np.ndarray  # [C] pixel confidence threshold per pseudo-label class
    prior_target: np.ndarray  # pi_T: class distribution of the pseudo-labels over all images
    prior_virtual: np.ndarray  # pi_V: class distribution of the kept pixels of V
    score_cut: float  # lowest image score in V

    def class_weights(
        self, beta: float = 1.0, clip: tuple[float, float] = (0.5, 5.0)
    ) -> np.ndarray:
        """alpha_k = (pi_T,k / pi_V,k)^beta, clipped: classes scarce in V count more."""
        lo, hi = clip
        # A class absent from V is infinitely scarce there, so it gets `hi` for any beta > 0
        # (clipping before the power would give it hi**beta, less than a scarce one's).
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = np.where(self.prior_virtual > 0, self.prior_target / self.prior_virtual, np.inf)
        alpha = np.clip(ratio**beta, lo, hi)
        return np.where(self.prior_target > 0, alpha, 1.0).astype(np.float32)

    def summary(self) -> dict:
        return {
            "virtual_images": len(self.virtual),
            "target_images": len(self.target),
            "score_cut": self.score_cut,
            "class_thresholds": self.class_thresholds.round(4).tolist(),
            "prior_target": self.prior_target.round(6).tolist(),
            "prior_virtual": self.prior_virtual.round(6).tolist(),
        }


def _normalise(counts: np.ndarray) -> np.ndarray:
    total = counts.sum()
    return counts / total if total > 0 else np.zeros_like(counts, dtype=np.float64)


def class_balanced_thresholds(hist: np.ndarray, tau: float, portion: float) -> np.ndarray:
    """CBST-style: per class, the confidence above which its top ``portion`` of pixels lie.

    ``hist`` is [C, bins] pixel counts; the result is capped at ``tau`` so that a class the
    model is unsure about still keeps its best pixels while confident classes keep ``tau``.
    """
    num_classes, bins = hist.shape
    thresholds = np.full(num_classes, tau, np.float64)
    for k in range(num_classes):
        total = hist[k].sum()
        if total == 0:
            continue
        from_top = np.cumsum(hist[k][::-1])  # pixels at or above each bin, highest first
        top_bin = bins - 1 - int(np.searchsorted(from_top, portion * total))
        thresholds[k] = min(tau, max(top_bin, 0) / bins)
    return thresholds


def kept_counts(hist: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """Pixels per class whose confidence bin starts at or above the class threshold."""
    bins = hist.shape[1]
    lower_edges = np.arange(bins) / bins
    keep = lower_edges[None, :] >= thresholds[:, None] - 1e-9
    return (hist * keep).sum(1)


def select(table: pa.Table, cfg: SelectConfig, num_classes: int = 19) -> Selection:
    """Split scored images into V and T; pixel thresholds; priors pi_T and pi_V.

    ``cfg`` gives either ``ratio`` (top fraction of images by score) or
    ``score_threshold``. Rows with an error are ignored.
    """
    ratio, score_threshold, tau = cfg.ratio, cfg.score_threshold, cfg.tau
    if (ratio is None) == (score_threshold is None):
        raise ValueError("give exactly one of ratio and score_threshold")
    if ratio is not None and not 0.0 < ratio <= 1.0:
        raise ValueError(f"ratio: {ratio} is out of range; allowed: 0 < ratio <= 1")
    top = (CONFIDENCE_BINS - 1) / CONFIDENCE_BINS
    if not 0.0 <= tau <= top:
        # Confidences are kept in bins of 1/CONFIDENCE_BINS: above the last bin's lower
        # edge, no bin, so no pixel, would be kept.
        raise ValueError(f"tau: {tau} is out of range; allowed: 0 <= tau <= {top}")
    if "error" in table.column_names:
        table = table.filter(pc.is_null(table["error"]))
    if table.num_rows == 0:
        raise ValueError("the scores table has no scored images to select from")
    ids = np.array(table["image_id"].to_pylist())
    scores = table["score"].to_numpy()
    order = np.lexsort((ids, -scores))  # best score first, ties by id: deterministic
    if ratio is not None:
        n_virtual = max(1, int(round(ratio * len(ids))))
    else:
        n_virtual = int((scores >= score_threshold).sum())
    in_v = np.zeros(len(ids), bool)
    in_v[order[:n_virtual]] = True

    bins = CONFIDENCE_BINS
    hist = np.stack(table["class_conf_hist"].to_numpy(zero_copy_only=False)).reshape(
        -1, num_classes, bins
    )
    # Thresholds act at the histogram's resolution, so that pi_V and alpha describe the
    # very pixels the adaptation keeps: tau is rounded up to the next bin edge.
    tau = math.ceil(tau * bins - 1e-9) / bins
    thresholds = (
        class_balanced_thresholds(hist.sum(0), tau, cfg.cb_portion)
        if cfg.class_balanced
        else np.full(num_classes, tau)
    )
    prior_target = _normalise(hist.sum((0, 2)).astype(np.float64))
    prior_virtual = _normalise(kept_counts(hist[in_v].sum(0), thresholds).astype(np.float64))
    return Selection(
        virtual=ids[order[:n_virtual]].tolist(),
        target=ids[order[n_virtual:]].tolist(),
        class_thresholds=thresholds,
        prior_target=prior_target,
        prior_virtual=prior_virtual,
        score_cut=float(scores[order[n_virtual - 1]]) if n_virtual else float("inf"),
    )


def _average_ranks(values: np.ndarray) -> np.ndarray:
    """Ranks from 0, tied values sharing their mean rank."""
    _, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    first = np.cumsum(counts) - counts
    return (first + (counts - 1) / 2.0)[inverse]


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Rank correlation, ties given their mean rank (per-image mIoU ties at 0 or 100);
    NaN for fewer than two pairs or a constant input."""
    if len(x) < 2:
        return float("nan")
    rx, ry = _average_ranks(np.asarray(x)), _average_ranks(np.asarray(y))
    if rx.std() == 0 or ry.std() == 0:
        return float("nan")
    return float(np.corrcoef(rx, ry)[0, 1])


def selection_quality(table: pa.Table, selection: Selection, num_classes: int = 19) -> dict:
    """Evaluation only: how right the virtual source is, from target labels in the table.

    ``kept_pixel_accuracy``: share of V's kept pseudo-label pixels that are correct;
    ``all_pixel_accuracy``: the same over every pixel of every image;
    ``kept_pixel_fraction``: share of V's pixels kept;
    ``score_miou_spearman``: rank correlation of image score and per-image mIoU.
    Accuracies count labelled pixels only: a void one (ego vehicle, say) is neither right
    nor wrong. A table scored before labelled pixels were counted gives none of these.
    """
    table = table.filter(pc.invert(pc.is_null(table["eval_labelled_hist"])))
    if table.num_rows == 0:
        return {}
    shape = (-1, num_classes, CONFIDENCE_BINS)

    def histograms(column: str) -> np.ndarray:
        return np.stack(table[column].to_numpy(zero_copy_only=False)).reshape(shape)

    hist, correct = histograms("class_conf_hist"), histograms("eval_correct_hist")
    labelled = histograms("eval_labelled_hist")
    in_v = np.isin(np.array(table["image_id"].to_pylist()), selection.virtual)
    kept = kept_counts(hist[in_v].sum(0), selection.class_thresholds).sum()
    kept_labelled = kept_counts(labelled[in_v].sum(0), selection.class_thresholds).sum()
    kept_ok = kept_counts(correct[in_v].sum(0), selection.class_thresholds).sum()
    miou = table["eval_miou"].to_numpy(zero_copy_only=False).astype(np.float64)
    score = table["score"].to_numpy(zero_copy_only=False).astype(np.float64)
    finite = np.isfinite(miou)
    return {
        "kept_pixel_accuracy": float(kept_ok / kept_labelled) if kept_labelled else None,
        "kept_pixel_fraction": float(kept / hist[in_v].sum()) if in_v.any() else None,
        "all_pixel_accuracy": float(correct.sum() / labelled.sum()) if labelled.sum() else None,
        "score_miou_spearman": spearman(score[finite], miou[finite]),
    }
