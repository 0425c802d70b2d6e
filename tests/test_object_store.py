"""Object storage: a scores directory and an adaptation's state in an S3 bucket, served
on 127.0.0.1 by moto (the S3 protocol through pyarrow, not a local folder)."""

import pytest

from sfda_ray import storage
from sfda_ray.adaptation import LocalEnv, make_plan, run_adaptation
from sfda_ray.dist.scoring import ScoringOptions, score_dataset

BUCKET = "sfda"


@pytest.fixture(scope="module")
def bucket(ray_session):
    """The bucket's base URI and a boto3 client to look into it (credentials: conftest)."""
    import boto3
    from moto.server import ThreadedMotoServer

    # Port 0: the server binds a free port itself, then says which (no race for it).
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    port = server.get_host_and_port()[1]
    client = boto3.client("s3", endpoint_url=f"http://127.0.0.1:{port}")
    client.create_bucket(Bucket=BUCKET)
    yield f"s3://{BUCKET}?endpoint_override=127.0.0.1:{port}&scheme=http", client
    server.stop()


def _keys(client, prefix: str) -> set[str]:
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
    return {o["Key"] for page in pages for o in page.get("Contents", [])}


def test_files_round_trip_through_a_bucket(bucket):
    base, client = bucket
    path = storage.join(base, "unit", "a", "b.bin")
    storage.prepare_output(storage.join(base, "unit"))
    storage.atomic_write_bytes(path, b"data")
    assert storage.read_bytes(path) == b"data" and storage.exists(path)
    assert storage.list_files(storage.join(base, "unit", "a")) == [path]
    assert "unit/a/b.bin" in _keys(client, "unit/")
    assert storage.remove(path) and not storage.exists(path) and not storage.remove(path)
    tree = storage.join(base, "unit", "tree")
    for name in ("c/d.bin", "e.bin"):
        storage.atomic_write_bytes(storage.join(tree, name), b"12345")
    assert storage.remove_tree(tree) == 10 and not _keys(client, "unit/tree")
    assert storage.remove_tree(tree) == 0
    with pytest.raises(ValueError, match="credentials in a URI would be written"):
        storage.resolve(f"s3://key:secret@{BUCKET}/x")


class _CountedReads:
    """A filesystem whose files count the reads made of them (each a request on S3)."""

    def __init__(self, fs, reads: list):
        self.fs, self.reads = fs, reads

    def open_input_file(self, path):
        fs, reads = self.fs, self.reads

        class File:
            def __init__(self):
                self.f = fs.open_input_file(path)

            def read(self, *n):
                reads.append(path)
                return self.f.read(*n)

            def __getattr__(self, name):
                return getattr(self.f, name)

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                self.f.close()

        return File()


def test_image_sizes_from_a_bucket(bucket, monkeypatch):
    """From one ranged read of the file's start, or, for a header longer than that (a
    JPEG with a large ICC profile), from the whole file; a bad file is named."""
    import io

    import numpy as np
    from PIL import Image

    import sfda_ray.data.io as image_io
    from sfda_ray.data.io import HEADER_BYTES, BadInputError, image_size

    base, _ = bucket
    files = {}
    for name, height, width, save in (
        ("label.png", 5, 7, {"format": "PNG"}),
        ("photo.jpg", 6, 9, {"format": "JPEG", "icc_profile": bytes(3 * HEADER_BYTES)}),
    ):
        buf = io.BytesIO()
        Image.fromarray(np.zeros((height, width, 3), np.uint8)).save(buf, **save)
        files[name] = buf.getvalue(), (height, width)
    files["bad.png"] = files["label.png"][0][:20], None
    assert files["photo.jpg"][0].index(b"\xff\xc0") > HEADER_BYTES  # its size lies beyond
    for name, (data, _) in files.items():
        storage.atomic_write_bytes(storage.join(base, "sizes", name), data)
    reads = []
    resolve = storage.resolve
    monkeypatch.setattr(
        image_io.storage, "resolve", lambda p: (_CountedReads(resolve(p)[0], reads), resolve(p)[1])
    )
    for name, (_, size) in files.items():
        path = storage.join(base, "sizes", name)
        if size is None:
            with pytest.raises(BadInputError, match=rf"{name}\?.*: unreadable header"):
                image_size(path)
        else:
            assert image_size(path) == size, name
    counts = {name: sum(p.endswith(name) for p in reads) for name in files}
    assert counts["label.png"] == 1 and counts["photo.jpg"] > 1, counts


@pytest.mark.slow
def test_scores_and_adaptation_state_live_in_a_bucket(
    bucket, tiny_benchmark, tiny_source_ckpt, tmp_path
):
    """Scoring writes its table, maps and AdaBN model into the bucket (the model from a
    Ray task); a rerun finds every image scored there; the adaptation starts from that
    model, reads the maps from the bucket and checkpoints its state into it."""
    from test_adapt import _adapt_cfg

    base, client = bucket
    scores = storage.join(base, "scores")
    options = ScoringOptions(batch_size=8, actors=1)
    summary = score_dataset(str(tiny_source_ckpt), str(tiny_benchmark), scores, options)
    assert summary["scored"] == 24 and summary["skipped"] == 0
    keys = _keys(client, "scores/")
    assert {"scores/scores.parquet", "scores/summary.json", "scores/source_adabn.pt"} <= keys
    assert sum(k.endswith("_label.png") for k in keys) == 24
    again = score_dataset(str(tiny_source_ckpt), str(tiny_benchmark), scores, options)
    assert again["scored_this_run"] == 0 and again["scored"] == 24  # all found in the bucket
    cfg = _adapt_cfg(**{"adapt.checkpoint_every": 4})
    plan = make_plan(cfg, str(tiny_source_ckpt), scores, str(tiny_benchmark))
    assert plan.bn_adapted and plan.checkpoint == storage.join(scores, "source_adabn.pt")
    maps = [r["pseudo_label_path"] for r in plan.virtual_rows]
    assert maps and all(p.startswith(f"s3://{BUCKET}/scores/") for p in maps)
    state = storage.join(base, "run", "state.pt")
    metrics = run_adaptation(plan, cfg, LocalEnv(state_path=state))["metrics"]
    assert metrics["iteration"] == 4
    assert _keys(client, "run/") == {"run/state.pt"}
    assert LocalEnv(state_path=state).load_state()["iteration"] == 4
