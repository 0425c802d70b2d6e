"""The files logged for each trial, made from real checkpoints and a real benchmark."""

import csv
import io
import json

from PIL import Image

from sfda_ray.report import evaluation_files

PNG = b"\x89PNG\r\n\x1a\n"


def test_evaluation_files(tiny_benchmark, tiny_source_ckpt):
    files = evaluation_files(str(tiny_source_ckpt), str(tiny_source_ckpt), str(tiny_benchmark))
    assert set(files) == {
        "per_class_iou.csv",
        "per_class_iou.png",
        "confusion_matrix.png",
        "evaluation.json",
        "overlays.png",
    }
    assert all(files[n].startswith(PNG) for n in files if n.endswith(".png"))
    report = json.loads(files["evaluation.json"])
    rows = list(csv.DictReader(io.StringIO(files["per_class_iou.csv"].decode())))
    assert [r["class"] for r in rows] == list(report["per_class"])
    assert 0.0 <= report["miou"] <= 100.0
    # Four target-val images, each: image | source | adapted | ground truth (48x96 tiles).
    grid = Image.open(io.BytesIO(files["overlays.png"]))
    assert grid.size == (4 * 96, 4 * 48)

    # At the adaptation's (smaller) input size: scored against full-size labels, tiles
    # at the image's size; the same figures as evaluate_checkpoint at that size.
    from sfda_ray.evaluate import evaluate_checkpoint

    small = evaluation_files(
        str(tiny_source_ckpt), str(tiny_source_ckpt), str(tiny_benchmark), size=(24, 48)
    )
    report = json.loads(small["evaluation.json"])
    assert sum(map(sum, report["confusion_matrix"])) == 8 * 48 * 96
    expected = evaluate_checkpoint(str(tiny_source_ckpt), str(tiny_benchmark), size=(24, 48))
    assert report["miou"] == expected["miou"]
    assert Image.open(io.BytesIO(small["overlays.png"])).size == (4 * 96, 4 * 48)


def test_a_val_split_without_pixels_of_the_classes_still_gets_its_files(tiny_source_ckpt, tmp_path):
    """Labels that are all 'unlabelled' (void, id 0): no mIoU to give, and no failure."""
    import numpy as np
    from data_fixtures import make_cityscapes, write_png

    root = tmp_path / "cs"
    make_cityscapes(root, {"train": ["t/t_0_19"], "val": ["v/v_0_19"]})
    write_png(root / "gtFine/val/v/v_0_19_gtFine_labelIds.png", np.zeros((16, 32), np.uint8))
    (tmp_path / "cs.yaml").write_text(f"data: {{kind: cityscapes, root: {root}}}\n")
    files = evaluation_files(
        str(tiny_source_ckpt), str(tiny_source_ckpt), str(tmp_path / "cs.yaml")
    )
    assert json.loads(files["evaluation.json"])["miou"] is None
    assert files["per_class_iou.png"].startswith(PNG)


def test_tile_grid_fits_tiles_of_other_sizes_and_pads_empty_rows():
    """An empty virtual source leaves its row of the selection grid empty; frames of
    another size are fitted to the first tile's."""
    import numpy as np

    from sfda_ray.pictures import tile_grid

    light, small = np.full((8, 16, 3), 200, np.uint8), np.zeros((4, 4, 3), np.uint8)
    grid = np.asarray(Image.open(io.BytesIO(tile_grid([[], [light, small]]))))
    assert grid.shape == (16, 32, 3)
    assert (grid[:8] == 0).all() and (grid[8:, :16] == 200).all()
    # Full-size frames (Cityscapes' 1024x2048) are shown at most 512 wide.
    frame = np.full((1024, 2048, 3), 90, np.uint8)
    grid = np.asarray(Image.open(io.BytesIO(tile_grid([[frame, frame], [frame]]))))
    assert grid.shape == (2 * 256, 2 * 512, 3) and (grid[:, :512] == 90).all()


def test_the_report_is_of_the_adapted_model_and_survives_a_bad_label(
    tiny_source_ckpt, tmp_path, caplog
):
    """The evaluation is the adapted checkpoint's, not the source's; a label that fails to
    decode is skipped and counted by the evaluation and leaves its overlay row without
    ground truth, rather than failing the trial."""
    import numpy as np
    import torch
    from data_fixtures import make_cityscapes, truncate

    from sfda_ray.evaluate import evaluate_checkpoint
    from sfda_ray.models import load_model, save_checkpoint

    model, meta = load_model(tiny_source_ckpt)
    with torch.no_grad():  # an "adapted" model that predicts car everywhere
        for conv in getattr(model, model.main_head).conv2d_list:
            conv.weight.zero_()
            conv.bias.zero_()
            conv.bias[13] = 10.0
    adapted = tmp_path / "adapted.pt"
    save_checkpoint(adapted, model, meta)

    root = tmp_path / "cs"
    make_cityscapes(root, {"train": ["t/t_0_19"], "val": ["v/v_0_19", "w/w_0_19"]})
    truncate(root / "gtFine/val/w/w_0_19_gtFine_labelIds.png", 60)  # header intact
    data = tmp_path / "cs.yaml"
    data.write_text(f"data: {{kind: cityscapes, root: {root}}}\n")
    files = evaluation_files(str(tiny_source_ckpt), str(adapted), str(data))
    report = json.loads(files["evaluation.json"])
    assert report["images"] == 1 and report["skipped"] == 1
    cm = report["confusion_matrix"]
    assert cm == evaluate_checkpoint(str(adapted), str(data))["confusion_matrix"]
    assert cm != evaluate_checkpoint(str(tiny_source_ckpt), str(data))["confusion_matrix"]
    assert sum(row[13] for row in cm) == sum(map(sum, cm))  # every pixel predicted car
    assert "overlays: no ground truth for" in caplog.text
    grid = np.asarray(Image.open(io.BytesIO(files["overlays.png"])))
    h, w = grid.shape[0] // 2, grid.shape[1] // 4
    assert (grid[h:, 3 * w :] == 0).all() and not (grid[:h, 3 * w :] == 0).all()
    assert not np.array_equal(grid[:, w : 2 * w], grid[:, 2 * w : 3 * w])  # source != adapted
