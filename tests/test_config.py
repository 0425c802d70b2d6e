import pytest

from sfda_ray.config import (
    Config,
    ConfigError,
    apply_overrides,
    changed_settings,
    describe_changes,
    load_config,
    parse_override,
)


def write(tmp_path, text):
    path = tmp_path / "cfg.yaml"
    path.write_text(text)
    return path


def test_defaults_and_yaml_values(tmp_path):
    cfg = load_config(
        write(tmp_path, "source:\n  lr: 0.02\n  iterations: 5\ndata:\n  size: [64, 128]\n")
    )
    assert cfg.source.lr == 0.02
    assert cfg.source.iterations == 5
    assert cfg.data.size == [64, 128]
    assert cfg.model.name == Config().model.name


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("source:\n  lrr: 0.1\n", "source: unknown key(s) lrr"),
        ("sourc:\n  lr: 0.1\n", "config: unknown key(s) sourc"),
        ("source:\n  lr: fast\n", "source.lr: 'fast' has the wrong type; expected a number"),
        ("source:\n  lr: -0.1\n", "source.lr: -0.1 is out of range; allowed: > 0.0"),
        ("source:\n  iterations: 2.5\n", "source.iterations: 2.5 has the wrong type"),
        ("source:\n  momentum: 1.5\n", "source.momentum: 1.5 is out of range; allowed: >= 0.0"),
        ("model:\n  mc_dropout: -0.2\n", "model.mc_dropout: -0.2 is out of range"),
        (
            "model:\n  mc_dropout: 1.0\n",
            "model.mc_dropout: 1.0 is out of range; allowed: >= 0.0 and < 1.0",
        ),
        ("model:\n  num_classes: 16\n", "model.num_classes: 16 is not allowed; allowed: 19"),
        ("adapt:\n  alpha_min: 6.0\n", "adapt.alpha_min: 6.0 is larger than alpha_max 5.0"),
        (
            "adapt:\n  lambda_mix: 1.0\n  lambda_st: 0.0\n",
            "adapt.lambda_mix: 1.0 needs lambda_v > 0 and lambda_st > 0 (here 1.0 and 0.0)",
        ),
        ("perf:\n  channels_last: auto\n", "perf.channels_last: 'auto' has the wrong type"),
        ("score:\n  mc_passes: 1\n", "score.mc_passes: 1 is not allowed; 0 (off) or at least 2"),
        ("model:\n  name: vgg\n", "model.name: 'vgg' is not allowed; allowed: deeplabv2_resnet18"),
        ("data:\n  hflip: 'yes'\n", "data.hflip: 'yes' has the wrong type; expected true or false"),
        ("data:\n  size: [64]\n", "data.size: [64] is not allowed"),
        ("data:\n  scale_min: 2.0\n  scale_max: 1.0\n", "data.scale_min: 2.0 is larger"),
        ("- just\n- a list\n", "expected a mapping at the top level"),
        ("source: [1, 2\n", "not valid YAML"),
        ("adapt:\n  lr: 0.1\nadapt:\n  lr: 0.2\n", "found the key 'adapt' a second time"),
        ("source:\n  lr: 1\n  lr: 2\n", "found the key 'lr' a second time"),
        ("sorce:\n", "unknown key(s) sorce"),  # an empty section is still a section
    ],
)
def test_bad_values_name_key_value_and_rule(tmp_path, text, fragment):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert fragment in str(err.value)
    assert str(path) in str(err.value)


def test_missing_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="nope.yaml does not exist"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match=f"config file {tmp_path} is not a file"):
        load_config(tmp_path)
    binary = tmp_path / "model.pt"
    binary.write_bytes(b"PK\x03\x04\xff\xfe")
    with pytest.raises(ConfigError, match=f"{binary}: not a UTF-8 text file"):
        load_config(binary)


def test_a_config_file_reads_as_a_user_means_it(tmp_path, monkeypatch):
    """1e-3 is a number (YAML 1.1 reads it as a string), ~ is the home folder, and a
    section whose keys are all commented out leaves the preset's values in place."""
    monkeypatch.setenv("HOME", str(tmp_path))
    write(tmp_path, "source:\n  lr: 1e-3\nadapt:\n  # iterations: 5000\n")
    cfg = load_config("~/cfg.yaml", preset={"adapt.iterations": 30})
    assert cfg.source.lr == 1e-3 and cfg.adapt.iterations == 30


def test_a_whole_section_is_not_replaced_by_an_override(tmp_path):
    """`--set data={kind: gta5}` would reset every other data key to its default."""
    for override in ({"data": {"kind": "gta5"}}, {"adapt": None}):
        with pytest.raises(ConfigError, match="a section, not a key; set its keys one by one"):
            load_config(None, override)


def test_yaml_is_loaded_safely(tmp_path):
    path = write(tmp_path, "source: !!python/object/apply:os.system ['echo hi']\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(path)


def test_flags_override_yaml_and_are_validated(tmp_path):
    path = write(tmp_path, "source:\n  lr: 0.02\n")
    cfg = load_config(path, {"source.lr": 0.5, "select.ratio": None, "select.score_threshold": 0.7})
    assert cfg.source.lr == 0.5
    assert cfg.select.ratio is None and cfg.select.score_threshold == 0.7
    assert cfg.source.batch_size == Config().source.batch_size
    with pytest.raises(ConfigError, match="give exactly one of ratio"):
        load_config(path, {"select.score_threshold": 0.7})
    with pytest.raises(ConfigError, match="source.batch_size: None has the wrong type"):
        load_config(path, {"source.batch_size": None})
    with pytest.raises(ConfigError, match="source.lr: 0.0 is out of range"):
        load_config(path, {"source.lr": 0})
    with pytest.raises(ConfigError, match="source.nope: unknown key"):
        apply_overrides(cfg, {"source.nope": 1})


def test_parse_override_reads_yaml_values():
    assert parse_override("data.size=[64, 128]") == ("data.size", [64, 128])
    assert parse_override("source.lr=1e-3") == ("source.lr", 1e-3)
    assert parse_override("score.split=nan") == ("score.split", "nan")  # a name, not a float
    # YAML 1.1 booleans, as the documented values of boolean keys.
    cfg = load_config(
        None, dict(map(parse_override, ["perf.channels_last=on", "perf.compile=false"]))
    )
    assert cfg.perf.channels_last is True and cfg.perf.compile is False
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        parse_override("source.lr")
    with pytest.raises(ConfigError, match=r"--set 'data.size=\[96,': the value: not valid YAML"):
        parse_override("data.size=[96,")


def test_shipped_configs_are_valid():
    from pathlib import Path

    folder = Path(__file__).parents[1] / "experiments" / "configs"
    configs = sorted(p for p in folder.glob("*.yaml") if not p.name.endswith("_space.yaml"))
    assert len(configs) >= 2
    for path in configs:
        cfg = load_config(path)
        if cfg.model.name == "deeplabv2_resnet101":  # 20,000 iterations: not on CPUs
            assert cfg.tune.gpus_per_worker >= 1, path.name
    # Search spaces are validated against a config instead (tests/test_tune.py).


def test_scoring_gpus_can_be_asked_for_before_any_gpu_node_exists():
    """An autoscaling cluster starts with no GPU: the config asks for them explicitly."""
    from sfda_ray.dist.scoring import ScoringOptions, scoring_gpus

    cfg = load_config(None, {"score.gpus_per_actor": 1, "score.actors": 4})
    options = ScoringOptions.from_config(cfg)
    assert (options.gpus_per_actor, options.actors) == (1.0, 4)
    assert scoring_gpus(options) == 1.0  # taken as given: no cluster is consulted
    assert ScoringOptions.from_config(load_config()).gpus_per_actor is None  # auto
    with pytest.raises(ConfigError, match="score.gpus_per_actor: -1"):
        load_config(None, {"score.gpus_per_actor": -1})


def test_every_config_key_has_a_row_in_the_readme_reference():
    import re
    from pathlib import Path

    from sfda_ray.config import Config, to_dict

    readme = (Path(__file__).parents[1] / "README.md").read_text()
    reference = readme.split("## Configuration reference", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in reference.splitlines() if line.startswith("| `")]
    documented = {key for row in rows for key in re.findall(r"`(\w+\.\w+)`", row.split("|")[1])}
    config = to_dict(Config())
    keys = {f"{section}.{key}" for section, values in config.items() for key in values}
    assert keys - documented == set()
    # No row for a key that is gone (other rows there name MLflow tags, `sfda.*`).
    assert {k for k in documented if k.split(".")[0] in config} - keys == set()


def test_a_changed_setting_is_named_by_its_dotted_key():
    recorded = {"config": {"adapt": {"lr": 0.01, "gone": 1}, "tune": {"metric": "proxy"}}}
    current = {"config": {"adapt": {"lr": 0.02, "new": 2}, "tune": {"metric": "proxy"}}}
    # A key only one side has was added or removed between versions: not a change.
    assert changed_settings(recorded, current) == ["config.adapt.lr"]
    assert changed_settings(current, current) == []
    keys = [f"k{i}" for i in range(10)]
    assert describe_changes(keys) == "k0, k1, k2, k3, k4, k5, k6, k7 and 2 more"
    assert describe_changes(keys[:2]) == "k0, k1"


def test_an_adaptation_run_with_other_settings_is_not_resumed(tmp_path):
    from sfda_ray.dist.train import RUN_FILE, STATE_FILE, _check_same_run

    state = tmp_path / "ray"
    state.mkdir()
    (state / STATE_FILE).write_bytes(b"")
    identity = {"adapt.lr": 0.01, "select.tau": 0.9, "plan": "abc"}
    _check_same_run(str(tmp_path), str(state), identity)  # records it
    assert (tmp_path / RUN_FILE).is_file()
    _check_same_run(str(tmp_path), str(state), identity)  # the same run: resumed
    with pytest.raises(ConfigError, match=r"\(adapt\.lr, plan \(selection, start checkpoint"):
        _check_same_run(str(tmp_path), str(state), {**identity, "adapt.lr": 0.02, "plan": "d"})


def test_an_unknown_compile_backend_is_named_when_compiling_is_on():
    with pytest.raises(ConfigError, match="perf.compile_backend: 'inductr' is not a torch.compile"):
        load_config(None, {"perf.compile": True, "perf.compile_backend": "inductr"})
    # Off, the backend is never used (nor torch._dynamo imported to list them).
    assert load_config(None, {"perf.compile_backend": "inductr"}).perf.compile is False
    assert load_config(None, {"perf.compile": True}).perf.compile_backend == "inductor"
