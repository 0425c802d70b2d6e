"""Checkpoint format: round trip, atomic write, safe loading, raw state dicts, key checks."""

import hashlib
import os
from pathlib import Path

import pytest
import torch

from sfda_ray.models import (
    CheckpointError,
    FCDiscriminator,
    build_model,
    file_fingerprint,
    load_checkpoint,
    load_model,
    load_weights,
    save_checkpoint,
)

META = {
    "class_names": ["road", "car", "sky"],
    "normalization": "imagenet",
    "train_config": {"lr": 0.01, "steps": [1, 2], "loss": {"adv": 0.001}},
    "data_fingerprint": "abc123",
    "iteration": 7,
}


def _trained_model():
    torch.manual_seed(0)
    model = build_model("deeplabv2_resnet18", 3, multi_level=True, mc_dropout=0.1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    model(torch.randn(2, 3, 32, 32)).mean().backward()
    optimizer.step()  # moves BN running stats and creates momentum buffers
    return model.eval(), optimizer


def test_round_trip(tmp_path):
    model, optimizer = _trained_model()
    disc = FCDiscriminator(3, ndf=8)
    path = tmp_path / "ckpt" / "model.pt"
    extra = {"discriminator": disc.state_dict(), "rng": torch.get_rng_state()}
    save_checkpoint(path, model, META, optimizer.state_dict(), extra)
    assert os.listdir(path.parent) == ["model.pt"]  # no temporary file left behind

    loaded, meta = load_model(path)
    x = torch.randn(1, 3, 40, 48)
    with torch.no_grad():
        assert torch.equal(loaded.eval()(x), model(x))
    assert {k: meta[k] for k in META} == META
    assert meta["num_classes"] == 3
    assert meta["arch"] == {
        "name": "deeplabv2_resnet18",
        "options": {"multi_level": True, "mc_dropout": 0.1},
    }

    ckpt = load_checkpoint(path)
    fresh = torch.optim.SGD(loaded.parameters(), lr=0.01, momentum=0.9)
    fresh.load_state_dict(ckpt["optimizer"])
    assert len(fresh.state) == len(optimizer.state) > 0
    disc2 = FCDiscriminator(3, ndf=8)
    disc2.load_state_dict(ckpt["extra"]["discriminator"])
    assert torch.equal(disc2.conv1.weight, disc.conv1.weight)

    overridden, meta2 = load_model(path, mc_dropout=0.3)
    assert overridden.dropout.p == 0.3 and meta2["arch"]["options"]["mc_dropout"] == 0.3


def test_round_trip_through_uri(tmp_path):
    model = build_model("deeplabv2_resnet18", 3)
    uri = f"file://{tmp_path}/run/model.pt"
    save_checkpoint(uri, model, {"iteration": 1})
    assert load_checkpoint(uri)["meta"]["iteration"] == 1
    assert file_fingerprint(uri) == file_fingerprint(tmp_path / "run" / "model.pt")


def test_a_bucket_gets_one_filesystem_per_process():
    """Making an S3 filesystem asks for the bucket's region: a scan of thousands of files
    must not do it per file. (A region in the URI: nothing here reaches the network.)"""
    import pyarrow.fs as pafs

    from sfda_ray import storage

    uris = ["s3://bucket/a/b.png?region=us-east-1", "s3://bucket/c/?region=us-east-1"]
    (fs_a, path_a), (fs_c, path_c) = map(storage.resolve, uris)
    assert fs_a is fs_c and isinstance(fs_a, pafs.S3FileSystem)
    assert [path_a, path_c] == [pafs.FileSystem.from_uri(u)[1] for u in uris]
    assert storage.resolve("s3://other/x?region=us-east-1")[0] is not fs_a
    assert storage.resolve(f"file://{Path.cwd()}/x")[1] == f"{Path.cwd()}/x"
    # A file under a URI with options (a MinIO endpoint, say) keeps them.
    options = "s3://bucket/runs?endpoint_override=localhost:9000"
    assert storage.join(options, "scores", "a.png") == (
        "s3://bucket/runs/scores/a.png?endpoint_override=localhost:9000"
    )
    assert storage.basename(storage.join(options, "a.png")) == "a.png"
    # A dataset YAML's relative root, under a URI whose options hold slashes of their own.
    spec = "s3://bucket/configs/cs.yaml?endpoint_override=http://localhost:9000"
    assert storage.beside(spec, "../cityscapes") == (
        "s3://bucket/cityscapes?endpoint_override=http://localhost:9000"
    )
    assert storage.beside(spec, "gta5") == (
        "s3://bucket/configs/gta5?endpoint_override=http://localhost:9000"
    )
    with pytest.raises(ValueError, match="'../../x' from s3://bucket/configs/cs.yaml leaves"):
        storage.beside(spec, "../../x")
    assert storage.beside(f"file://{Path.cwd()}/c/d.yaml", "../e") == f"file://{Path.cwd()}/e"
    # What a file is, by its name without the options (a manifest, a dataset YAML).
    assert storage.has_suffix("s3://b/m.parquet?region=us-east-1", ".parquet")
    assert storage.has_suffix(spec, ".yaml", ".yml") and not storage.has_suffix(spec, ".parquet")


def test_non_plain_meta_is_refused_before_writing(tmp_path):
    model = build_model("deeplabv2_resnet18", 3)
    path = tmp_path / "model.pt"
    meta = {**META, "train_config": {"root": Path("/data")}}
    with pytest.raises(CheckpointError, match=r"\['train_config'\]\['root'\]"):
        save_checkpoint(path, model, meta)
    with pytest.raises(CheckpointError, match="class_names"):
        save_checkpoint(path, model, {**META, "class_names": ["road"]})
    assert not path.exists()


class _Malicious:
    """Pickles as a call to os.remove: loading it unsafely would delete a file."""

    def __init__(self, victim: str):
        self.victim = victim

    def __reduce__(self):
        return (os.remove, (self.victim,))


def test_load_refuses_pickled_code(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("still here")
    path = tmp_path / "evil.pt"
    torch.save({"format": "sfda_ray.checkpoint/v1", "meta": _Malicious(str(victim))}, path)
    with pytest.raises(CheckpointError, match="refusing to load") as err:
        load_checkpoint(path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)  # one line, with why
    with pytest.raises(CheckpointError, match="refusing to load"):
        load_model(path)
    assert victim.read_text() == "still here"


def test_raw_state_dict_with_prefixes_and_without_num_batches_tracked(tmp_path):
    torch.manual_seed(0)
    model = build_model("deeplabv2_resnet18", 5, layout="adaptsegnet").eval()
    state = {
        "module." + k: v
        for k, v in model.state_dict().items()
        if not k.endswith("num_batches_tracked")
    }
    path = tmp_path / "public.pth"
    torch.save(state, path)
    assert load_checkpoint(path)["format"] == "raw"
    with pytest.raises(CheckpointError, match="raw state dict .* `sfda-ray import-checkpoint"):
        load_model(path)

    loaded, meta = load_model(path, arch="deeplabv2_resnet18", layout="adaptsegnet")
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded.eval()(x), model(x))
    assert meta["num_classes"] == 5 and meta["normalization"] == "caffe_bgr"


def test_import_checkpoint_makes_a_public_state_dict_usable(tmp_path, capsys):
    """Every stage takes sfda_ray checkpoints; `import-checkpoint` converts a public one."""
    from sfda_ray.cli import main

    torch.manual_seed(0)
    model = build_model("deeplabv2_resnet18", 19, layout="adaptsegnet", multi_level=True).eval()
    raw = tmp_path / "gta5.pth"
    torch.save({"Scale." + k: v for k, v in model.state_dict().items()}, raw)
    args = ["import-checkpoint", str(raw), "--model", "deeplabv2_resnet18"]
    out = tmp_path / "gta5_source.pt"
    # The wrong layout is refused, naming the keys; nothing is written.
    assert main([*args, "--layout", "advent", "--out", str(out)]) == 2
    assert "missing keys: " in capsys.readouterr().err and not out.exists()
    assert main([*args, "--layout", "adaptsegnet", "--multi-level", "--out", str(out)]) == 0
    assert "19 classes, caffe_bgr input" in capsys.readouterr().out
    loaded, meta = load_model(out)  # as every stage loads it: no options needed
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded.eval()(x), model(x))
    assert meta["arch"]["options"]["layout"] == "adaptsegnet" and loaded.multi_level
    assert meta["normalization"] == "caffe_bgr" and meta["imported_from"] == str(raw)
    bad = ["--layout", "adaptsegnet", "--multi-level", "--normalization", "rgb"]
    with pytest.raises(SystemExit):
        main([*args, *bad, "--out", str(tmp_path / "x.pt")])
    assert "--normalization: invalid choice: 'rgb'" in capsys.readouterr().err
    # What exists is not replaced without --force, and the input never.
    again = [*args, "--layout", "adaptsegnet", "--multi-level"]
    before = out.read_bytes()
    assert main([*again, "--out", str(out)]) == 2
    assert "exists; pass --force" in capsys.readouterr().err and out.read_bytes() == before
    assert main([*again, "--out", str(raw), "--force"]) == 2
    assert "is the checkpoint being imported" in capsys.readouterr().err
    assert main([*again, "--out", str(out), "--force"]) == 0


def test_a_model_of_another_label_space_is_refused(tmp_path, capsys):
    """Every dataset is read into Cityscapes' 19 train ids: a 16-class SYNTHIA model (as
    ADVENT publishes one) cannot be imported, and an sfda_ray checkpoint of another class
    count is refused by every command, naming the file."""
    from sfda_ray.cli import main

    model = build_model("deeplabv2_resnet18", 16, layout="advent").eval()
    raw = tmp_path / "synthia16.pth"
    torch.save(model.state_dict(), raw)
    out = tmp_path / "synthia16.pt"
    args = ["import-checkpoint", str(raw), "--model", "deeplabv2_resnet18", "--layout", "advent"]
    assert main([*args, "--out", str(out)]) == 2
    assert "synthia16.pth predicts 16 classes, not 19" in capsys.readouterr().err
    assert not out.exists()
    save_checkpoint(out, model, {"normalization": "imagenet"})
    with pytest.raises(CheckpointError, match="synthia16.pt predicts 16 classes, not 19"):
        load_model(out, num_classes=19)
    assert main(["eval", "--checkpoint", str(out), "--data", str(tmp_path)]) == 2
    assert "predicts 16 classes, not 19" in capsys.readouterr().err
    trunk = tmp_path / "trunk.pth"
    torch.save({k: v for k, v in model.state_dict().items() if "layer6" not in k}, trunk)
    with pytest.raises(CheckpointError, match="trunk.pth has no ASPP classifier"):
        load_model(trunk, arch="deeplabv2_resnet18")


def test_class_count_mismatch_is_named():
    source = build_model("deeplabv2_resnet18", 19).state_dict()
    with pytest.raises(CheckpointError, match="checkpoint has 19 classes, model has 16"):
        load_weights(build_model("deeplabv2_resnet18", 16), source)


def test_missing_and_unexpected_keys_are_named():
    asn = build_model("deeplabv2_resnet18", 3, layout="adaptsegnet").state_dict()
    del asn["layer4.1.conv2.weight"]
    advent = build_model("deeplabv2_resnet18", 3, layout="advent")
    with pytest.raises(CheckpointError) as err:
        load_weights(advent, asn)
    message = str(err.value)
    assert "layer4.1.conv2.weight" in message
    assert "layer6.conv2d_list.0.weight" in message  # missing
    assert "layer5.conv2d_list.3.bias" in message  # unexpected
    assert "layout" in message

    missing, unexpected = load_weights(advent, asn, strict=False)
    assert "layer4.1.conv2.weight" in missing and "layer5.conv2d_list.0.weight" in unexpected


def test_file_fingerprint(tmp_path, monkeypatch):
    import os
    import time

    from sfda_ray import storage

    reads = []
    read_bytes = storage.read_bytes
    monkeypatch.setattr(storage, "read_bytes", lambda p: reads.append(p) or read_bytes(p))
    path = tmp_path / "blob.bin"
    path.write_bytes(b"weights")
    assert file_fingerprint(path) == hashlib.sha256(b"weights").hexdigest()[:16]
    path.write_bytes(b"weights2")
    assert file_fingerprint(path) == hashlib.sha256(b"weights2").hexdigest()[:16]
    path.write_bytes(b"weights3")  # the same size, maybe the same timestamp tick
    assert file_fingerprint(path) == hashlib.sha256(b"weights3").hexdigest()[:16]
    assert len(reads) == 3  # a file just written is read each time
    # A settled file is read once while its size and time stay; rewritten, read again.
    settled = time.time() - 60
    os.utime(path, (settled, settled))
    assert (
        file_fingerprint(path)
        == file_fingerprint(path)
        == hashlib.sha256(b"weights3").hexdigest()[:16]
    )
    assert len(reads) == 4
    path.write_bytes(b"weights4")
    os.utime(path, (settled + 1, settled + 1))
    assert file_fingerprint(path) == hashlib.sha256(b"weights4").hexdigest()[:16]
    assert len(reads) == 5


def test_arch_keys_outside_options_are_refused(tmp_path):
    """A setting beside name/options would be dropped when the model is rebuilt."""
    from sfda_ray.models import build_model
    from sfda_ray.models.checkpoint import CheckpointError, save_checkpoint

    model = build_model("deeplabv2_resnet18", 19, output_stride=16)
    bad = {"arch": {"name": "deeplabv2_resnet18", "output_stride": 16}, "num_classes": 19}
    with pytest.raises(CheckpointError, match="must be"):
        save_checkpoint(tmp_path / "x.pt", model, bad)
    assert not (tmp_path / "x.pt").exists()


def test_a_damaged_checkpoint_file_is_named(tmp_path, capsys):
    """Empty, text or truncated: one error naming the file, from every loader and the CLI."""
    from sfda_ray.cli import main

    good = tmp_path / "good.pt"
    save_checkpoint(good, build_model("deeplabv2_resnet18", 19), {"normalization": "imagenet"})
    damaged = {
        "empty.pt": b"",
        "notes.pt": b"not a checkpoint\n",
        "truncated.pt": good.read_bytes()[: good.stat().st_size // 2],
    }
    for name, content in damaged.items():
        path = tmp_path / name
        path.write_bytes(content)
        with pytest.raises(CheckpointError) as err:
            load_model(path)
        assert str(path) in str(err.value) and "\n" not in str(err.value)
        assert "not a readable torch checkpoint" in str(err.value) or (
            "or it is damaged (Unsupported operand" in str(err.value)
        )
        assert main(["eval", "--checkpoint", str(path), "--data", str(tmp_path)]) == 2
        assert capsys.readouterr().err == f"sfda-ray: error: {err.value}\n"


def test_an_sfda_ray_checkpoint_keeps_its_own_architecture(tmp_path):
    path = tmp_path / "os16.pt"
    save_checkpoint(path, build_model("deeplabv2_resnet18", 19, output_stride=16), {})
    with pytest.raises(CheckpointError, match="already an sfda_ray checkpoint"):
        load_model(path, arch={"name": "deeplabv2_resnet18", "options": {}})
    assert load_model(path)[0].arch["options"]["output_stride"] == 16
    with pytest.raises(CheckpointError, match=r"os16.pt: cannot build .*unexpected keyword"):
        load_model(path, no_such_option=1)


def test_heads_of_another_shape_point_at_the_layout_options():
    """ADVENT's multi-level model read as single-level: layer5 is the layer3 head there."""
    multi = build_model("deeplabv2_resnet18", 19, layout="adaptsegnet", multi_level=True)
    single = build_model("deeplabv2_resnet18", 19, layout="adaptsegnet")
    with pytest.raises(CheckpointError, match="shape mismatch: layer5.*check the layout"):
        load_weights(single, multi.state_dict())
