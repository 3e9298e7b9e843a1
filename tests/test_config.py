import pytest

from ltstudy.config import load_config, parse_overrides, resolve_config
from ltstudy.errors import ConfigError


def test_defaults_follow_the_method_recipe_then_user_values():
    cfg = resolve_config({"method": "ldam_drw", "lr": 0.05, "max_m": 0.3})
    assert cfg.train.lr == 0.05 and cfg.params.max_m == 0.3
    assert cfg.params.s == 30.0 and cfg.train.epochs == 200  # published defaults


def test_round_trip_through_to_dict():
    cfg = resolve_config({"method": "balanced_softmax", "tau": 0.5, "milestones": [0.5, 0.75]})
    assert resolve_config(cfg.to_dict()) == cfg


def test_unknown_key_names_it_and_suggests():
    with pytest.raises(ConfigError, match=r"unknown key 'learning_rate'.*'ce'"):
        resolve_config({"learning_rate": 0.1})
    with pytest.raises(ConfigError, match="did you mean 'max_m'"):
        resolve_config({"method": "ldam_drw", "max_mm": 0.1})


def test_key_of_another_method_is_unknown():
    with pytest.raises(ConfigError, match="unknown key 'tau'"):
        resolve_config({"method": "ce", "tau": 1.0})


@pytest.mark.parametrize("values, key", [
    ({"lr": "fast"}, "lr"), ({"epochs": 2.5}, "epochs"), ({"imbalance": 0.5}, "imbalance"),
    ({"method": "ldam_drw", "beta": 1.5}, "beta"), ({"schedule": "linear"}, "schedule"),
])
def test_bad_values_name_the_key(values, key):
    with pytest.raises(ConfigError, match=f"bad value for '{key}'"):
        resolve_config(values)


def test_unknown_method():
    with pytest.raises(ConfigError, match="unknown method 'nope'"):
        resolve_config({"method": "nope"})


def test_overrides_are_parsed_as_yaml():
    assert parse_overrides(["lr=0.05", "milestones=[0.5, 0.75]", "amp=false", "data_root=/x"]) == {
        "lr": 0.05, "milestones": [0.5, 0.75], "amp": False, "data_root": "/x"}
    with pytest.raises(ConfigError, match="key=value"):
        parse_overrides(["lr"])


def test_file_then_flags_then_overrides(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("method: ldam_drw\nlr: 0.2\nepochs: 7\nprovenance: {study: s}\n")
    cfg = load_config(f, ["epochs=3"], imbalance=50)
    assert (cfg.method, cfg.train.lr, cfg.train.epochs, cfg.train.imbalance) == ("ldam_drw", 0.2, 3, 50)


@pytest.mark.parametrize("text, match", [("lr: [0.1\n", "malformed YAML"), ("- 1\n- 2\n", "mapping")])
def test_bad_files(tmp_path, text, match):
    f = tmp_path / "c.yaml"
    f.write_text(text)
    with pytest.raises(ConfigError, match=match):
        load_config(f)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")


@pytest.mark.parametrize("values, message", [
    ({"dataset": "imagenet"}, "unknown dataset 'imagenet'; choose one of cifar10-lt"),
    ({"model": "resnet-32"}, "unknown model 'resnet-32'; choose one of resnet32"),
])
def test_dataset_and_model_names_are_checked(values, message):
    with pytest.raises(ConfigError, match=message):
        resolve_config(values)


def test_validate_space_catches_a_typo_in_fixed(tmp_path, capsys):
    from ltstudy.cli import main

    space = tmp_path / "space.yaml"
    space.write_text("method: ce\nfixed: {dataset: cifar10lt}\ntune:\n  lr: {type: float, low: 0.01, high: 0.5}\n")
    with pytest.raises(SystemExit) as code:
        main(["validate-space", str(space)])
    err = capsys.readouterr().err
    assert code.value.code == 2 and "unknown dataset 'cifar10lt'" in err and len(err.splitlines()) == 1


def test_the_key_lists_name_real_settings():
    from ltstudy.config import DATA_KEYS, DATA_LOCATION_KEYS, PATH_KEYS, TrainConfig

    assert set(DATA_KEYS) | set(PATH_KEYS) | set(DATA_LOCATION_KEYS) <= set(TrainConfig.model_fields)
