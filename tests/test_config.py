"""Configs: shipped files load, unknown keys and bad overrides fail with useful messages, the CLI reports them."""

from __future__ import annotations

import dataclasses
import importlib
import subprocess
import sys
import typing

import pytest
import yaml

from instdisc_lite import ConfigError, TrainConfig, config, load_config, shipped_configs
from instdisc_lite.__main__ import main
from instdisc_lite.config import CONFIG_DIR, config_from_dict, parse_overrides, validate_config


def test_shipped_configs_are_the_yaml_files():
    names = shipped_configs()
    assert set(names) >= {"fashion_mnist_quick", "cifar10_resnet18", "imagenet_resnet50", "imagenet_resnet18"}
    assert names == sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


@pytest.mark.parametrize("name", shipped_configs())
def test_every_shipped_config_loads_with_its_yaml_values(name):
    config = load_config(name)
    assert isinstance(config, TrainConfig)
    assert config.name == name
    raw = yaml.safe_load((CONFIG_DIR / f"{name}.yaml").read_text())
    if "base" in raw:  # a config built on another: its own keys override the base's
        base = load_config(raw.pop("base"))
        for key, value in base.to_dict().items():
            if key not in raw and key != "name":
                assert getattr(config, key) == value, key
    for key, value in raw.items():
        assert getattr(config, key) == value, key
    # every value has its declared type (ints widened to float where a float is declared)
    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        value = getattr(config, f.name)
        if value is None:
            continue
        allowed = tuple(typing.get_origin(a) or a for a in (typing.get_args(hints[f.name]) or (hints[f.name],)))
        if typing.get_origin(hints[f.name]) is list:
            allowed = (list,)
        assert isinstance(value, allowed), (f.name, value)


def test_paper_defaults_in_gpu_configs():
    for name in ("cifar10_resnet18", "imagenet_resnet50", "imagenet_resnet18"):
        c = load_config(name)
        assert (c.objective, c.num_negatives, c.temperature, c.bank_momentum, c.lr, c.epochs) == (
            "nce",
            4096,
            0.07,
            0.5,
            0.03,
            200,
        )
        # CIFAR-10 runs NCE with a running Z (a fixed one goes stale on 10-class data: benchmarks/fixed_z.py)
        assert c.low_dim == 128 and c.z_mode == ("running" if name == "cifar10_resnet18" else "fixed")


def test_unknown_key_in_yaml_lists_valid_keys(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("dataset: fashion_mnist\nlearning_rate: 0.1\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    message = str(err.value)
    assert "learning_rate" in message
    for key in TrainConfig.field_names():
        assert key in message


def test_unknown_override_key_lists_valid_keys():
    with pytest.raises(ConfigError, match="bogus") as err:
        load_config("fashion_mnist_quick", ["bogus=1"])
    assert "Valid keys" in str(err.value) and "num_negatives" in str(err.value)


def test_overrides_parse_and_convert():
    assert parse_overrides(["lr=0.1", "epochs=5", "train_subset=null", "name=x=y", "amp=false"]) == {
        "lr": 0.1, "epochs": 5, "train_subset": None, "name": "x=y", "amp": False
    }  # fmt: skip
    config = load_config(
        "fashion_mnist_quick",
        ["lr=1", "epochs=3", "train_subset=null", "lr_milestones=[0.5, 1]", "shared_negatives=false", "name=abc"],
    )
    assert config.lr == 1.0 and isinstance(config.lr, float)
    assert config.epochs == 3 and config.train_subset is None
    assert config.lr_milestones == [0.5, 1.0] and all(isinstance(v, float) for v in config.lr_milestones)
    assert config.shared_negatives is False and config.name == "abc"
    # dict overrides go through the same checks
    assert load_config("cifar10_resnet18", {"batch_size": 7}).batch_size == 7


@pytest.mark.parametrize(
    ("override", "words"),
    [
        ("epochs=abc", ["epochs", "integer", "abc"]),
        ("epochs=2.5", ["epochs", "integer"]),
        ("lr=abc", ["lr", "number", "abc"]),
        ("temperature=[1]", ["temperature", "number"]),
        ("amp=maybe", ["amp", "true/false"]),
        ("lr_milestones=0.5", ["lr_milestones", "list"]),
        ("lr_milestones=[a]", ["lr_milestones", "number"]),
        ("batch_size=null", ["batch_size", "null"]),
        ("epochs", ["key=value"]),
    ],
)
def test_bad_override_fails_clearly(override, words):
    with pytest.raises(ConfigError) as err:
        load_config("fashion_mnist_quick", [override])
    for word in words:
        assert word in str(err.value)


def test_config_from_dict_rejects_unknown_and_round_trips():
    config = load_config("imagenet_resnet18")
    assert config_from_dict(config.to_dict()) == config
    with pytest.raises(ConfigError, match="nope"):
        config_from_dict({**config.to_dict(), "nope": 1})


def test_missing_config_name_lists_shipped_ones():
    with pytest.raises(ConfigError, match="fashion_mnist_quick"):
        load_config("no_such_config")


def test_cli_unknown_key_exits_nonzero_with_message(capsys):
    code = main(["train", "--config", "fashion_mnist_quick", "--set", "bogus=1"])
    assert code != 0
    err = capsys.readouterr().err
    assert "bogus" in err and "Valid keys" in err


def test_cli_bad_value_exits_nonzero(capsys):
    assert main(["train", "--config", "fashion_mnist_quick", "--set", "epochs=abc"]) != 0
    assert "epochs" in capsys.readouterr().err


def test_cli_show_and_configs(capsys):
    assert main(["show", "--config", "cifar10_resnet18", "--set", "epochs=7", "lr=0.5"]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    assert shown["epochs"] == 7 and shown["lr"] == 0.5 and shown["arch"] == "resnet18_cifar"
    assert main(["configs"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in shipped_configs()) and "num_negatives" in out


def test_cli_subprocess_exit_code():
    proc = subprocess.run(
        [sys.executable, "-m", "instdisc_lite", "train", "--config", "fashion_mnist_quick", "--set", "bogus=1"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode != 0
    assert "bogus" in proc.stderr and "Valid keys" in proc.stderr


# ------------------------------------------------------------------------------------------------
# Validation: every key's type, range and choices, checked when the config is built
# ------------------------------------------------------------------------------------------------

BAD_VALUES = [
    # ints >= 1
    ("epochs", 0), ("batch_size", 0), ("batch_size", -3), ("low_dim", 0), ("num_negatives", 0), ("knn_k", 0),
    ("eval_every", 0), ("checkpoint_every", 0),
    # optional ints: None or >= 1
    ("train_subset", 0), ("eval_subset", 0), ("max_steps_per_epoch", 0), ("max_steps_per_epoch", -1),
    # ints >= 0
    ("num_workers", -1), ("warmup_epochs", -1), ("seed", -1), ("seed", 2**32),
    # ints stay exact: floats (even integral ones) and float notation are refused
    ("epochs", 2.5), ("epochs", 100.0), ("epochs", "1e2"), ("batch_size", "abc"), ("batch_size", None),
    ("epochs", True),
    # floats > 0, finite
    ("lr", -1), ("lr", 0), ("lr", float("nan")), ("lr", float("inf")), ("lr", "nan"), ("lr", "abc"), ("lr", True),
    ("temperature", 0), ("temperature", float("-inf")), ("knn_temperature", 0), ("lr_gamma", 0),
    # floats >= 0
    ("weight_decay", -1e-4), ("proximal", -1), ("proximal", float("nan")),
    # [0, 1) and (0, 1]
    ("bank_momentum", 1.0), ("bank_momentum", -0.1), ("z_momentum", 1), ("sgd_momentum", 1.5),
    ("crop_scale", 0), ("crop_scale", 1.5),
    # milestones: fractions in (0, 1], strictly ascending
    ("lr_milestones", [0.8, 0.6]), ("lr_milestones", [0.6, 0.6]), ("lr_milestones", [0, 0.5]),
    ("lr_milestones", [0.5, 1.2]), ("lr_milestones", [float("nan")]), ("lr_milestones", 0.5),
    ("lr_milestones", ["a"]), ("lr_milestones", None),
    # choices
    ("dataset", "mnist"), ("arch", "vit"), ("objective", "simclr"), ("z_mode", "learned"), ("augment", "heavy"),
    ("bank_init", "zeros"), ("device", "gpu"), ("device", "cuda:"), ("device", "cuda:x"), ("device", "CPU"),
    # bools
    ("amp", "maybe"), ("sync_bn", 1), ("scale_lr", "true"), ("progress", None),
    # the run directory's name: one path component
    ("name", ".."), ("name", "../x"), ("name", "/abs"), ("name", "a/b"), ("name", "a\\b"), ("name", ".hidden"),
    ("name", "."), ("name", ""), ("name", "x y"), ("name", "x\0"), ("name", "x\ny"), ("name", "a" * 101),
    ("name", None), ("name", ["a"]),
    # paths
    ("out_dir", ""), ("data_root", ""), ("out_dir", " "), ("data_root", None),
    # your own data (their combinations with dataset: test_own_data_keys_go_together)
    ("data_path", ""), ("test_path", ["a.npz"]), ("image_size", 0), ("image_size", 32.0), ("flip", "yes"),
    ("flip", None),
]  # fmt: skip


@pytest.mark.parametrize(("key", "value"), BAD_VALUES, ids=[f"{k}={v!r}" for k, v in BAD_VALUES])
def test_bad_value_names_key_and_value_in_one_line(key, value):
    with pytest.raises(ConfigError) as err:
        config_from_dict({key: value})
    message = str(err.value)
    assert f"config key {key!r}" in message
    assert "\n" not in message and "\r" not in message
    if value is not None:
        assert repr(value)[:20] in message  # the bad value, as given


def test_bad_value_message_says_what_is_valid():
    with pytest.raises(ConfigError) as err:
        config_from_dict({"batch_size": 0})
    assert str(err.value) == "config key 'batch_size' must be an integer >= 1, got 0"
    with pytest.raises(ConfigError, match=r"must be a single directory name .*not starting with '\.'.*got '\.\./x'"):
        config_from_dict({"name": "../x"})
    with pytest.raises(ConfigError, match=r"must be a number in \[0, 1\), got 1\.0"):
        config_from_dict({"bank_momentum": 1.0})
    with pytest.raises(ConfigError, match=r"write it as an integer literal"):
        config_from_dict({"epochs": 100.0})


def test_unknown_choice_lists_the_valid_ones():
    from instdisc_lite.models import ARCHITECTURES
    from instdisc_lite.nce import Z_MODES
    from instdisc_lite.train import OBJECTIVES

    choices = {
        "dataset": config.DATASETS, "augment": config.AUGMENTS, "bank_init": config.BANK_INITS,
        "arch": list(ARCHITECTURES), "objective": OBJECTIVES, "z_mode": Z_MODES,
    }  # fmt: skip
    needs = {"npz": {"data_path": "mine.npz"}, "folder": {"data_path": "images", "image_size": 32}}  # own data
    for key, valid in choices.items():
        assert len(valid) >= 2, key
        with pytest.raises(ConfigError) as err:
            config_from_dict({key: "nope"})
        assert all(choice in str(err.value) for choice in valid), (key, str(err.value))
        for choice in valid:  # and each of them is accepted
            assert getattr(config_from_dict({key: choice, **needs.get(choice, {})}), key) == choice


GOOD_VALUES = [
    ("num_workers", 0), ("warmup_epochs", 0), ("seed", 0), ("seed", 2**32 - 1), ("weight_decay", 0), ("proximal", 0),
    ("bank_momentum", 0), ("z_momentum", 0.999), ("sgd_momentum", 0.0), ("crop_scale", 1), ("crop_scale", 1e-3),
    ("lr_milestones", []), ("lr_milestones", [1.0]), ("lr_milestones", [0.1, 0.5, 1]), ("lr_gamma", 2),
    ("train_subset", None), ("train_subset", 128), ("eval_subset", 1), ("max_steps_per_epoch", None),
    ("device", "auto"), ("device", "cpu"), ("device", "cuda"), ("device", "cuda:1"), ("device", "mps"),
    ("name", "run.v2_a-b"), ("name", "A"), ("name", "a" * 100), ("name", "x..y"),
    ("out_dir", "/tmp/runs"), ("data_root", "../data"), ("sync_bn", True), ("scale_lr", False),
    ("flip", False), ("data_path", None), ("test_path", None), ("image_size", None),
]  # fmt: skip
# values that are valid after conversion: (key, value, what the config holds)
CONVERTED = [("lr", "1e-3", 0.001), ("lr", 1, 1.0), ("epochs", "7", 7), ("name", 2024, "2024"), ("crop_scale", 1, 1.0)]


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [(k, v, v) for k, v in GOOD_VALUES] + CONVERTED,
    ids=[f"{k}={v!r}" for k, v in GOOD_VALUES] + [f"{k}={v!r}" for k, v, _ in CONVERTED],
)
def test_boundary_values_are_accepted(key, value, expected):
    got = getattr(config_from_dict({key: value}), key)
    assert got == expected
    if typing.get_type_hints(TrainConfig)[key] is float:
        assert isinstance(got, float), (key, got)
    elif expected is not None and not isinstance(expected, float | list):
        assert type(got) is type(expected), (key, got)


def test_every_field_has_a_rule_and_the_defaults_pass():
    assert set(config._RULES) == set(TrainConfig.field_names())
    assert validate_config(TrainConfig()) == TrainConfig()
    assert TrainConfig().validate() == TrainConfig()


def test_new_distributed_fields():
    c = TrainConfig()
    assert c.sync_bn is False and c.scale_lr is True
    c = load_config("cifar10_resnet18", ["sync_bn=true", "scale_lr=false"])
    assert c.sync_bn is True and c.scale_lr is False


def test_train_subset_smaller_than_a_batch_fails():
    with pytest.raises(ConfigError) as err:
        config_from_dict({"train_subset": 100, "batch_size": 128})
    message = str(err.value)
    assert "'train_subset'" in message and "'batch_size'" in message and "no step" in message and "\n" not in message
    assert config_from_dict({"train_subset": 128, "batch_size": 128}).train_subset == 128
    with pytest.raises(ConfigError, match="train_subset"):  # the shipped quick config trains batches of 256
        load_config("fashion_mnist_quick", ["train_subset=255"])


@pytest.mark.parametrize(
    ("values", "words"),
    [
        ({"dataset": "npz"}, ["'data_path' must be set", "'npz'", ".npz file"]),
        ({"dataset": "folder", "image_size": 32}, ["'data_path' must be set", "'folder'"]),
        ({"dataset": "folder", "data_path": "images"}, ["'image_size' must be set", "'folder'", "resized"]),
        ({"dataset": "npz", "data_path": "images.npy"}, ["'data_path' must be a .npz file", "dataset: folder"]),
        ({"dataset": "npz", "data_path": "a.npz", "test_path": "b"}, ["'test_path' must be a .npz file"]),
        ({"dataset": "cifar10", "data_path": "a.npz"}, ["'data_path' is used only by dataset npz or folder"]),
        ({"dataset": "fashion_mnist", "image_size": 32}, ["'image_size' is used only", "'fashion_mnist'"]),
        ({"dataset": "imagenet", "test_path": "val"}, ["'test_path' is used only", "set dataset to npz or folder"]),
    ],
)
def test_own_data_keys_go_together(values, words):
    """dataset npz / folder need data_path (a .npz file for npz; a folder needs image_size); no other dataset reads
    them, so setting them there is refused rather than ignored. One line, before any data is read."""
    with pytest.raises(ConfigError) as err:
        config_from_dict(values)
    assert "\n" not in str(err.value) and all(w in str(err.value) for w in words), str(err.value)


def test_own_data_configs_load():
    # the quick recipe does not flip (digits and letters cannot take it); a user turns flips on for photographs
    config = load_config("fashion_mnist_quick", ["dataset=npz", "data_path=mine.npz", "test_path=test.npz"])
    assert (config.data_path, config.test_path, config.image_size, config.flip) == ("mine.npz", "test.npz", None, False)
    config = load_config("fashion_mnist_quick", ["dataset=folder", "data_path=photos", "image_size=64", "flip=true"])
    assert (config.data_path, config.test_path, config.image_size, config.flip) == ("photos", None, 64, True)


def test_validate_config_checks_a_replaced_config():
    base = load_config("fashion_mnist_quick")
    with pytest.raises(ConfigError, match="'temperature'"):
        validate_config(dataclasses.replace(base, temperature=0.0))
    with pytest.raises(ConfigError, match="'name'"):
        dataclasses.replace(base, name="../escape").validate()
    checked = validate_config(dataclasses.replace(base, lr=1, lr_milestones=(0.5,)))
    assert checked.lr == 1.0 and isinstance(checked.lr, float) and checked.lr_milestones == [0.5]


# ------------------------------------------------------------------------------------------------
# Numbers written as strings (YAML 1.1 reads 1e-3 as one)
# ------------------------------------------------------------------------------------------------


def test_exponent_without_dot_is_a_float():
    assert yaml.safe_load("1e-3") == "1e-3"  # why this is needed
    parsed = parse_overrides(["lr=1e-3", "temperature=1E-1", "lr_milestones=[5e-1, 1]", "name=1e3", "epochs=1e2"])
    assert parsed == {"lr": 0.001, "temperature": 0.1, "lr_milestones": [0.5, 1], "name": "1e3", "epochs": "1e2"}
    assert isinstance(parsed["lr"], float)
    config = load_config("fashion_mnist_quick", ["lr=1e-3", "lr_milestones=[5e-1, 8e-1]"])
    assert config.lr == 0.001 and config.lr_milestones == [0.5, 0.8]
    assert load_config("fashion_mnist_quick", {"lr": "2e-3"}).lr == 0.002
    assert load_config("fashion_mnist_quick", ["name=1e3"]).name == "1e3"


def test_yaml_file_with_exponent_floats_loads(tmp_path):
    path = tmp_path / "sci.yaml"
    path.write_text("dataset: fashion_mnist\nlr: 1e-3\nweight_decay: 5e-4\nlr_milestones: [5e-1, 8e-1]\n")
    config = load_config(path)
    assert (config.lr, config.weight_decay, config.lr_milestones) == (0.001, 0.0005, [0.5, 0.8])
    assert isinstance(config.lr, float) and config.name == "sci"


def test_integers_stay_exact(tmp_path):
    with pytest.raises(ConfigError, match=r"'epochs' must be an integer >= 1, got '1e2'"):
        load_config("fashion_mnist_quick", ["epochs=1e2"])
    path = tmp_path / "float_epochs.yaml"
    path.write_text("epochs: 100.0\n")
    with pytest.raises(ConfigError, match=r"'epochs' must be an integer >= 1, got 100\.0"):
        load_config(path)
    assert load_config("fashion_mnist_quick", ["epochs=100"]).epochs == 100


def test_bools_and_non_numbers():
    assert parse_overrides(["amp=false", "compile=true"]) == {"amp": False, "compile": True}
    with pytest.raises(ConfigError, match=r"'lr' must be a finite number > 0, got True"):
        load_config("fashion_mnist_quick", ["lr=true"])
    with pytest.raises(ConfigError, match=r"'lr' must be a finite number > 0, got 'abc'"):
        load_config("fashion_mnist_quick", ["lr=abc"])


def test_broken_yaml_is_a_one_line_config_error(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("lr: [0.1\nepochs: 3\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert "not valid YAML" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="not valid YAML") as err:
        parse_overrides(["lr_milestones=[0.5"])
    assert "\n" not in str(err.value)
    path.write_text("1: x\n")  # a non-string key is an unknown key, not a TypeError
    with pytest.raises(ConfigError, match="unknown config key"):
        load_config(path)


# ------------------------------------------------------------------------------------------------
# The CLI: bad values exit 2 with one line, before any data is read
# ------------------------------------------------------------------------------------------------


class DataRead(Exception):
    pass


@pytest.fixture
def no_data(monkeypatch):
    """Make reading data fail loudly (train imports build_data by name, so patch both places)."""

    def build_data(*args, **kwargs):
        raise DataRead

    # importlib: the package attribute ``instdisc_lite.train`` is the train() function, not the module
    for module in ("instdisc_lite.data", "instdisc_lite.train"):
        monkeypatch.setattr(importlib.import_module(module), "build_data", build_data)


@pytest.mark.parametrize(
    "override", ["batch_size=0", "temperature=0", "name=../x", "checkpoint_every=0", "lr=nan", "train_subset=10"]
)
def test_cli_bad_value_exits_2_with_one_line_before_reading_data(override, no_data, capsys, tmp_path):
    code = main(["train", "--config", "fashion_mnist_quick", "--set", override, f"out_dir={tmp_path}"])
    assert code == 2
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    key = override.split("=")[0]
    assert len(lines) == 1 and lines[0].startswith("error: config key") and repr(key) in lines[0], captured.err
    assert captured.out == ""
    assert not any(tmp_path.iterdir())  # no run directory either


def test_cli_valid_config_does_reach_the_data(no_data, tmp_path):
    # the control for the test above: without the bad value, train goes on to read data (and hits the fake)
    with pytest.raises(DataRead):
        main(["train", "--config", "fashion_mnist_quick", "--set", "device=cpu", f"out_dir={tmp_path}"])


def test_cli_show_parses_exponent_floats(capsys):
    assert main(["show", "--config", "fashion_mnist_quick", "--set", "lr=1e-3"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["lr"] == 0.001


def test_base_key_builds_on_another_config_and_detects_loops(tmp_path):
    child = tmp_path / "child.yaml"
    child.write_text("base: cifar10_resnet18\nepochs: 3\n")
    config = load_config(child)
    assert config.epochs == 3 and config.arch == "resnet18_cifar" and config.name == "child"
    sibling = tmp_path / "grandchild.yaml"
    sibling.write_text("base: child.yaml\nlr: 0.1\n")  # relative to the file
    assert (load_config(sibling).lr, load_config(sibling).epochs) == (0.1, 3)
    loop = tmp_path / "loop.yaml"
    loop.write_text("base: loop.yaml\n")
    with pytest.raises(ConfigError, match="loops"):
        load_config(loop)
    with pytest.raises(ConfigError, match="no shipped config named 'nonexistent'"):
        child.write_text("base: nonexistent\n")
        load_config(child)


def test_image_passes_and_epochs_the_later_one_wins(tmp_path):
    quick = load_config("fashion_mnist_quick")
    assert quick.image_passes == 1_800_000
    assert load_config("fashion_mnist_quick", ["epochs=5"]).image_passes is None  # epochs alone drop the budget
    assert load_config("fashion_mnist_quick", {"epochs": 5, "image_passes": 1000}).image_passes == 1000
    assert load_config("fashion_mnist_quick", ["lr=0.1"]).image_passes == 1_800_000  # other keys keep it
    child = tmp_path / "child.yaml"
    child.write_text("base: fashion_mnist_quick\nepochs: 7\n")
    assert (load_config(child).image_passes, load_config(child).epochs) == (None, 7)
    from instdisc_lite.train import _resolve_config  # a config built in code takes overrides the same way

    assert _resolve_config(quick, {"epochs": 3}).image_passes is None
    with pytest.raises(ConfigError, match="image_passes"):
        load_config("fashion_mnist_quick", ["image_passes=0"])


@pytest.mark.parametrize("images, epochs", [(60_000, 30), (8_000, 225), (12_000, 150), (7_000, 257), (10**8, 1)])
def test_resolve_epochs_spends_the_budget_on_any_number_of_images(images, epochs):
    resolved = config.resolve_epochs(load_config("fashion_mnist_quick"), images)
    assert resolved.epochs == epochs and resolved.image_passes == 1_800_000
    plain = load_config("fashion_mnist_quick", ["epochs=4"])
    assert config.resolve_epochs(plain, images) is plain  # no budget: epochs as set
