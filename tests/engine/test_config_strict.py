"""Strictness of the config loader (engine/config.py, engine/data/config.py): YAML 1.2 numbers,
non-finite and out-of-range values, ``~`` in paths, null spellings, duplicate YAML keys, exact
Literal types and the "did you mean" hints."""
from __future__ import annotations

import math
import os

import pytest
import yaml

from engine.config import Config, ConfigError, OptimConfig, config_from_dict, describe, load_config, validate
from engine.data.config import DataConfig


# -- YAML 1.2 floats ---------------------------------------------------------------------------
@pytest.mark.parametrize("override, section, name, expected", [
    ("data.batch_size=1e3", "data", "batch_size", 1000),          # an integral float is an int
    ("optim.lr=1e-3", "optim", "lr", 1e-3),
    ("schedule.max_steps=5e8", "schedule", "max_steps", 500_000_000),
    ("model.overrides.drop_path_rate=1e-1", "model", "overrides", {"drop_path_rate": 0.1}),
    ("optim.betas=[9e-1, 9.99e-1]", "optim", "betas", (0.9, 0.999)),
])
def test_exponent_floats_are_numbers_in_overrides(override, section, name, expected):
    got = getattr(getattr(load_config(None, [override]), section), name)
    assert got == expected and type(got) is type(expected)


def test_exponent_floats_are_numbers_in_files(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("data:\n  batch_size: 1e3\noptim:\n  lr: 5e-4\n  eps: 1E-8\n"
                 "model:\n  overrides: {drop_path_rate: 1e-1}\n")
    cfg = load_config(str(p))
    assert cfg.data.batch_size == 1000 and cfg.optim.lr == 5e-4 and cfg.optim.eps == 1e-8
    assert cfg.model.overrides == {"drop_path_rate": 0.1}


def test_non_integral_floats_stay_errors_for_int_fields():
    with pytest.raises(ConfigError, match=r"data.batch_size: expected an integer, got 2.5"):
        load_config(None, ["data.batch_size=2.5"])
    with pytest.raises(ConfigError, match=r"data.batch_size: expected an integer"):
        load_config(None, ["data.batch_size=.inf"])


# -- non-finite and invalid numbers --------------------------------------------------------------
@pytest.mark.parametrize("override", [
    "optim.lr=nan", "optim.lr=inf", "optim.lr=.nan", "optim.lr=-.inf", "optim.eps=nan",
    "optim.weight_decay=nan", "schedule.end_lr=nan", "schedule.warmup_start_lr=nan",
    "deepspeed.gradient_clipping=inf", "data.target_fps=nan", "finetune.mixup_alpha=inf",
    "optim.betas=[.nan, 0.9]", "data.mean=[0.4, .inf, 0.4]", "model.drop_path=nan",
])
def test_non_finite_floats_are_rejected_naming_the_field(override):
    key = override.split("=")[0]
    with pytest.raises(ConfigError, match=rf"{key}(\[\d\])?: expected a finite number"):
        load_config(None, [override])


@pytest.mark.parametrize("override, message", [
    ("data.std=[0,0,0]", r"data.std must be > 0"),
    ("data.std=[0.2,-0.1,0.2]", r"data.std must be > 0"),
    ("data.mean=[123.675,116.28,103.53]", r"statistics of pixels in \[0, 1\].*divided by 255"),
    ("data.std=[58.395,57.12,57.375]", r"statistics of pixels in \[0, 1\].*divided by 255"),
    ("data.mean=[0.45,0.45]", r"data.mean: expected 3 values"),
    ("data.std=[0.225]", r"data.std: expected 3 values"),
    ("data.clips_per_epoch=-5", r"data.clips_per_epoch must be >= 0"),
    ("data.rand_augment_n=-1", r"data.rand_augment_n must be >= 0"),
    ("data.validation_workers=-2", r"data.validation_workers must be >= 0"),
    ("data.seed=-1", r"data.seed must be >= 0"),
    ("data.seed=9300000000000", r"data.seed must be at most 9223\d+, got 9300000000000"),  # (DALI's int64 seed)
    ("data.short_videos=skip", r"data.short_videos='skip': expected one of \('pad', 'bad'\)"),
    ("train.seed=-1", r"train.seed must be >= 0"),
    ("train.seed=18446744073709551616", r"train.seed must be at most 18446744073708"),
    ("deepspeed.zero_stage='2'", r"'2' is not one of 0, 1, 2, 3; write it unquoted: 2$"),
    ("model.drop_path=1.5", r"model.drop_path must be in \[0, 1\)"),
    ("train.output_dir=", r"train.output_dir must not be empty"),
    ("train.output_dir=  ", r"train.output_dir must not be empty"),
])
def test_invalid_numbers_and_empty_output_dir_are_config_errors(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_validate_catches_nan_in_a_config_built_in_python():
    """``x <= 0`` lets NaN through; the checks are written so that it fails them."""
    cfg = Config(optim=OptimConfig(lr=math.nan))
    with pytest.raises(ConfigError, match="optim.lr must be finite"):
        validate(cfg)
    with pytest.raises(ValueError, match="data.target_fps must be finite"):
        DataConfig(target_fps=math.nan)


def test_data_config_built_in_python_checks_the_pixel_statistics():
    """The loader checks the count; a ``DataConfig`` built directly gets the same checks."""
    with pytest.raises(ValueError, match=r"data.mean: expected 3 values"):
        DataConfig(mean=(0.45, 0.45))
    with pytest.raises(ValueError, match=r"divided by 255"):
        DataConfig(mean=(123.675, 116.28, 103.53), std=(58.395, 57.12, 57.375))


def test_data_errors_through_a_dict_name_the_field():
    with pytest.raises(ConfigError, match=r"data.std must be > 0"):
        config_from_dict({"data": {"std": [0.0, 0.2, 0.2]}})


# -- ~ in paths --------------------------------------------------------------------------------
def test_tilde_is_expanded_in_path_fields_from_overrides_and_files(tmp_path):
    home = os.path.expanduser("~")
    cfg = load_config(None, ["train.output_dir=~/runs/x", "data.root=~/k400", "data.cache_dir=~",
                             "finetune.pretrained=~/b.safetensors"])
    assert cfg.train.output_dir == os.path.join(home, "runs/x")
    assert cfg.data.root == os.path.join(home, "k400") and cfg.data.cache_dir == home
    assert cfg.finetune.pretrained == os.path.join(home, "b.safetensors")
    p = tmp_path / "c.yaml"
    p.write_text("train:\n  output_dir: ~/runs/y\ndata:\n  root: ~/v\n")
    cfg = load_config(str(p))
    assert cfg.train.output_dir == os.path.join(home, "runs/y") and cfg.data.root == os.path.join(home, "v")
    # not a path: kept as written
    assert load_config(None, ["model.name=~x"]).model.name == "~x"  # (finetune.eval_split is now checked)
    assert DataConfig(root="~/d").root == os.path.join(home, "d")  # built directly, too


# -- null spellings and --help-config ----------------------------------------------------------
@pytest.mark.parametrize("text", ["null", "None", "none", "~", "NULL"])
def test_null_spellings_set_an_optional_field(text):
    assert load_config(None, ["model.drop_path=0.2", f"model.drop_path={text}"]).model.drop_path is None


@pytest.mark.parametrize("text", ["null", "None", "none"])
def test_null_on_a_string_field_is_an_error_not_a_word(text):
    with pytest.raises(ConfigError, match=rf"data.root is a string and cannot be null.*data.root='{text}'"):
        load_config(None, [f"data.root={text}"])


def test_quoted_strings_on_string_fields():
    assert load_config(None, ["data.root='null'"]).data.root == "null"
    assert load_config(None, ["finetune.pretrained=''", "data.root=\"a b\""]).finetune.pretrained == ""
    assert load_config(None, ["data.root=007"]).data.root == "007"  # unquoted: the raw text


def test_help_config_values_read_back_as_overrides():
    text = describe(Config())
    assert "model.drop_path = null" in text and "log.progress_bar = true" in text
    assert "finetune.pretrained = ''" in text and "= None" not in text and "= True" not in text
    overrides = [line.strip().replace(" = ", "=", 1) for line in text.splitlines()
                 if line.startswith("  ") and not line.startswith("      ")]
    assert len(overrides) > 50
    assert load_config(None, overrides) == Config()


# -- duplicate keys ----------------------------------------------------------------------------
def test_duplicate_yaml_keys_are_errors_with_their_line(tmp_path):
    p = tmp_path / "dup.yaml"
    p.write_text("optim:\n  lr: 1.0e-3\nschedule:\n  epochs: 3\noptim:\n  weight_decay: 0.1\n")
    with pytest.raises(ConfigError, match=r"dup.yaml: duplicate key 'optim' at line 5 \(first at line 1\)"):
        load_config(str(p))
    p.write_text("optim:\n  lr: 1.0e-3\n  lr: 2.0e-3\n")
    with pytest.raises(ConfigError, match=r"duplicate key 'lr' at line 3 \(first at line 2\)"):
        load_config(str(p))
    with pytest.raises(ConfigError, match=r"override 'model.overrides=\{a: 1, a: 2\}': duplicate key 'a'"):
        load_config(None, ["model.overrides={a: 1, a: 2}"])


def test_yaml_merge_keys_still_work(tmp_path):
    p = tmp_path / "merge.yaml"
    p.write_text("optim: &o\n  lr: 1.0e-3\nmodel:\n  overrides:\n    <<: {a: 1}\n    b: 2\n")
    assert load_config(str(p)).model.overrides == {"a": 1, "b": 2}
    assert yaml.safe_load("a: 1\na: 2\n") == {"a": 2}  # what plain PyYAML does: silently the last


# -- Literal exact types -----------------------------------------------------------------------
@pytest.mark.parametrize("text", ["2.0", "true", "'2'"])
def test_literal_fields_need_the_exact_type(text):
    with pytest.raises(ConfigError, match=r"deepspeed.zero_stage: .* is not one of 0, 1, 2, 3"):
        load_config(None, [f"deepspeed.zero_stage={text}"])
    assert load_config(None, ["deepspeed.zero_stage=2"]).deepspeed.zero_stage == 2


# -- did-you-mean hints --------------------------------------------------------------------------
@pytest.mark.parametrize("override, hint", [
    ("epochs=3", "did you mean 'schedule.epochs'?"),
    ("lr=1e-3", "did you mean 'optim.lr'?"),
    ("batch_size=4", "did you mean 'data.batch_size'?"),
    ("seed=1", "did you mean 'data.seed' or 'train.seed'?"),
    ("epoch=3", "did you mean 'schedule.epochs'?"),
    ("train.lr=1", "did you mean 'optim.lr'?"),
    ("optim.lrr=1", "did you mean 'optim.lr'?"),
    ("datta.root=/x", "did you mean 'data'?"),
])
def test_hints_search_fields_by_name(override, hint):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert hint in str(e.value)


@pytest.mark.parametrize("override", ["optim.learning_rate=1", "zzz=1", "deepspeed.precision=xyz"])
def test_no_hint_when_nothing_is_close(override):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert "did you mean" not in str(e.value)


def test_config_file_path_and_null_strings_in_files(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "c.yaml").write_text("data:\n  root: ~/k400\n")
    assert load_config("~/c.yaml").data.root == str(tmp_path / "k400")  # --config=~/c.yaml
    (tmp_path / "n.yaml").write_text("data:\n  root: null\n")
    with pytest.raises(ConfigError, match=r"data.root: expected a string, got null"):
        load_config(str(tmp_path / "n.yaml"))


def test_yaml_files_read_yaml_1_2_numbers_and_no_dates(tmp_path):
    """YAML 1.1 read ``seed: 010`` as 8 (octal), ``epochs: 1:30`` as 90 (base 60) and a date-like
    name as a date; a string field written as a number lost its text (``root: 1.10`` ran as '1.1')."""
    def load(text):
        path = tmp_path / "c.yaml"
        path.write_text(text)
        return load_config(str(path))

    c = load("train: {seed: 010, output_dir: 2024-06-01}\noptim: {lr: 1e-3}\ndata: {batch_size: 0x10}\n")
    assert (c.train.seed, c.train.output_dir, c.optim.lr, c.data.batch_size) == (10, "2024-06-01", 1e-3, 16)
    with pytest.raises(ConfigError, match=r"schedule.epochs: expected an integer, got '1:30'"):
        load("schedule: {epochs: 1:30}\n")
    with pytest.raises(ConfigError, match=r"data.root: expected a string, got the number 1.1 .*quote the value"):
        load("data: {root: 1.10}\n")
    assert load("data: {root: '1.10'}\n").data.root == "1.10"
    assert load("data: {batch_size: 3}\nmodel:\n  # name: x\n").model == Config().model  # a section left empty


@pytest.mark.parametrize("override", ["data.root=1e3", "train.output_dir=0o17", "data.root=010", "data.root=2024-06-01",
                                      "model.overrides={a: '1e3'}", "train.output_dir=1:30"])
def test_the_saved_config_reads_back_the_same(override):
    """config.yaml is written so that it loads to the same config: a string the loader takes for a
    number is quoted (``root: 1e3`` was written bare and read back as 1000.0)."""
    from engine.config import _yaml_load, config_to_yaml

    c = load_config(None, [override])
    assert config_from_dict(_yaml_load(config_to_yaml(c))) == c
    assert config_from_dict(yaml.safe_load(config_to_yaml(c))) == c  # and a YAML 1.1 reader too


def test_yaml_mistakes_are_one_line_config_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim:\n  lr: [1\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: not valid YAML: line 3, column 1: expected ',' or ']'") as e:
        load_config(str(bad))
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match=r"^override 'optim.lr=\[1': not valid YAML: line 1") as e:
        load_config(None, ["optim.lr=[1"])
    assert "\n" not in str(e.value)
    bad.write_text("model: {overrides: &x {self: *x}}\n")  # a RecursionError traceback before
    with pytest.raises(ConfigError, match="an alias .* that contains itself"):
        load_config(str(bad))


def test_none_in_a_free_form_mapping_is_null_but_the_word_none_stays():
    assert load_config(None, ["model.overrides.hog_norm=None"]).model.overrides == {"hog_norm": None}
    # 'none' is a value: the no-normalisation ablation, an offload device
    assert load_config(None, ["model.overrides.hog_norm=none"]).model.overrides == {"hog_norm": "none"}
    assert load_config(None, ["train.seed=1_000"]).train.seed == 1000


@pytest.mark.parametrize("argv,message", [
    (["pretrain", "-c", "configs/demo_pretrain.yaml", "-c", "configs/demo_finetune.yaml", "--help-config"],
     "-c given twice"),  # the first recipe was dropped silently
    (["pretrain", "--config=", "--help-config"], "--config is empty"),  # a default run for -c "$UNSET"
    (["finetune", "--resume", "", "--help-config"], "--resume is empty"),
    (["export", "runs/x", "train.output_dir=/elsewhere"], "export takes no section.field=value overrides"),
])
def test_cli_refuses_what_it_would_ignore(argv, message, capsys):
    from engine.cli import main

    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize("argv,message", [
    (["data", "prepar", "raw", "--check"], "unknown data command 'prepar' (did you mean 'prepare'?)"),
    (["data"], "no data command given"),
])
def test_cli_names_an_unknown_data_command(argv, message, capsys):
    """`maskfeat data prepar ...` printed the usage line alone (exit 2), not what was wrong."""
    from engine.cli import main

    assert main(argv) == 2 and message in capsys.readouterr().err
