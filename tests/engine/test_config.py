"""Config loading (strict, typed, dotted overrides), derived values, launcher environment."""
from __future__ import annotations

import dataclasses
import glob
import os

import pytest
import torch
import yaml

from engine.config import (
    Config,
    ConfigError,
    apply_overrides,
    config_from_dict,
    config_to_yaml,
    derive,
    describe,
    field_docs,
    load_config,
)
from engine.distributed import _first_slurm_host, deepspeed_config, launch_env
from engine.data.config import DataConfig

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_overrides_are_typed_by_the_field():
    cfg = load_config(None, [
        "data.root=/k400", "optim.lr=8e-4", "data.batch_size=3", "deepspeed.zero_stage=2",
        "data.train_scale=[0.3, 1]", "model.overrides.target=pixel", "log.tensorboard=false",
        "model.drop_path=0.2", "data.root=007",
    ])
    assert cfg.data.root == "007"  # str fields keep the raw text
    assert cfg.optim.lr == pytest.approx(8e-4) and isinstance(cfg.optim.lr, float)  # YAML reads '8e-4' as str
    assert cfg.data.batch_size == 3
    assert cfg.deepspeed.zero_stage == 2
    assert cfg.data.train_scale == (0.3, 1.0)
    assert cfg.model.overrides == {"target": "pixel"}
    assert cfg.log.tensorboard is False
    assert cfg.model.drop_path == pytest.approx(0.2)
    assert load_config(None, ["model.drop_path=null"]).model.drop_path is None
    # true/false, or how many of the first blocks are recomputed
    for text, value in (("true", True), ("false", False), ("8", 8), ("0", 0)):
        got = load_config(None, [f"model.activation_checkpointing={text}"]).model.activation_checkpointing
        assert got == value and type(got) is type(value)


@pytest.mark.parametrize("override, expected", [
    ("optim.lrr=1", "did you mean 'optim.lr'"),
    ("datta.root=/x", "did you mean 'data'"),
    ("data.batchsize=2", "did you mean 'data.batch_size'"),
    ("schedule.warmup=3", "did you mean 'schedule.warmup_epochs'"),
])
def test_unknown_key_names_the_closest_valid_key(override, expected):
    with pytest.raises(ConfigError, match=expected):
        load_config(None, [override])


@pytest.mark.parametrize("override, expected", [
    ("optim.lr=fast", "optim.lr: expected a number"),
    ("data.batch_size=2.5", "data.batch_size: expected an integer"),
    ("log.tensorboard=maybe", "log.tensorboard: expected true/false"),
    ("deepspeed.zero_stage=4", "not one of 0, 1, 2, 3"),
    ("deepspeed.precision=bf61", "did you mean 'bf16'"),
    ("train.device=gpu", "did you mean 'cuda'"),  # (difflib offered 'cpu')
    ("finetune.eval_split=validation", "did you mean 'val'"),  # (no hint)
    ("data.train_scale=[0.5]", "expected 2 values"),
    ("data.batch_size=0", "batch_size must be >= 1"),
    ("mask.ratio=1.5", "mask.ratio must be in"),
    ("optim.layer_decay=1.5", "layer_decay must be in"),
    ("model.activation_checkpointing=-2", "a number of blocks >= 0"),
    ("model.activation_checkpointing=some", "does not match"),
    ("optim.lr", "must look like section.field=value"),
    ("optim.lr.x=1", "not a section"),
    ("log.every_steps=0", "every_steps must be >= 1"),
    ("optim.betas=[1.5, 0.9]", r"optim.betas must be in \[0, 1\)"),
    ("schedule.end_lr=-1", "end_lr must be >= 0"),
    ("schedule.warmup_start_lr=-1e-6", "warmup_start_lr and end_lr must be >= 0"),
    ("schedule.end_lr=1e-2", r"end_lr=0.01 must be below optim.lr="),  # a cosine that rose 100x
    ("train.keep_checkpoints=-1", "train.keep_checkpoints must be >= 0"),
    ("deepspeed.gradient_clipping=-1", "gradient_clipping must be >= 0"),
    ("finetune.num_classes=-3", "num_classes must be >= 0"),
    # regression: a typo failed only when the eval loader was built, after files were written
    ("finetune.eval_split=vall", r"eval_split must be one of train, val, test, got 'vall'; did you mean 'val'"),
    ("finetune.eval_split=holdout", r"got 'holdout'$"),
])
def test_bad_values_are_clear(override, expected):
    with pytest.raises(ConfigError, match=expected):
        load_config(None, [override])


def test_yaml_file_is_strict(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("optim:\n  lr: 1.0e-3\n  weight_decy: 0.1\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: unknown config key 'optim.weight_decy'; did you mean 'optim.weight_decay'"):
        load_config(str(p))
    p.write_text("optim: [1, 2]\n")
    with pytest.raises(ConfigError, match="optim: expected a mapping"):
        load_config(str(p))
    with pytest.raises(ConfigError, match="not found"):
        load_config(str(tmp_path / "missing.yaml"))
    # regression: a folder or a binary file was a traceback (exit 1), not a config error (exit 2)
    with pytest.raises(ConfigError, match=r"cannot read config file .*: Is a directory"):
        load_config(str(tmp_path))
    (tmp_path / "weights.pt").write_bytes(b"PK\x03\x04\x14\x00\x80\xff\xfe\x00")
    with pytest.raises(ConfigError, match=r"cannot read config file .*weights.pt: not UTF-8 text"):
        load_config(str(tmp_path / "weights.pt"))
    p.write_text("optim:\n  lr: 1.0e-3\n")  # a good file: a bad override is blamed on the command line
    with pytest.raises(ConfigError, match="bad.yaml with the command-line overrides: optim.lr: expected a number"):
        load_config(str(p), ["optim.lr=abc"])


def test_bad_model_settings_are_config_errors(tmp_path):
    from engine.pretrain import create_model, run_pretrain

    with pytest.raises(ConfigError, match="model: unknown override 'embed_dimm'.*did you mean embed_dim"):
        create_model("mvitv2_tiny", "pretrain", embed_dimm=32)
    with pytest.raises(ConfigError, match="model: unknown model variant 'mvitv2_s'.*did you mean mvitv2_s_16x4"):
        create_model("mvitv2_s", "pretrain")
    with pytest.raises(ConfigError, match="model: mvitv2_tiny: hog_norm must be one of"):
        create_model("mvitv2_tiny", "pretrain", hog_norm="nonee")
    for kind, dataset, model in (("image_block", "demo", "mvitv2_tiny"), ("cube", "image_folder", "vit_tiny")):
        cfg = load_config(None, [f"mask.kind={kind}", f"data.dataset={dataset}", f"model.name={model}",
                                 f"train.output_dir={tmp_path}"])  # refused before any model or loader
        with pytest.raises(ConfigError, match=f"mask.kind={kind} does not fit data.dataset={dataset}"):
            run_pretrain(cfg)


def test_yaml_round_trip_and_overrides_win(tmp_path):
    cfg = load_config(None, ["optim.lr=3e-4", "data.mean=[0.5, 0.5, 0.5]", "mask.kind=tube"])
    p = tmp_path / "c.yaml"
    p.write_text(config_to_yaml(cfg))
    again = load_config(str(p))
    assert again == cfg
    assert load_config(str(p), ["mask.kind=frame"]).mask.kind == "frame"


def test_a_mapping_override_merges_into_the_recipe():
    """``optim={lr: 1e-3}`` replaced the recipe's whole section: its reference batch (16) and layer
    decay (0.875) fell back to the defaults, a 16x smaller LR without layer decay, silently."""
    recipe = os.path.join(REPO, "configs", "finetune_mvitv2_l_16x4_k400.yaml")
    base = load_config(recipe)
    cfg = load_config(recipe, ["optim={lr: 1.0e-3}", "schedule={epochs: 10}"])
    assert cfg.optim == dataclasses.replace(base.optim, lr=1e-3)
    assert cfg.schedule == dataclasses.replace(base.schedule, epochs=10)
    assert base.optim.layer_decay == 0.875 and base.schedule.warmup_epochs == 5
    ablation = os.path.join(REPO, "configs", "ablations", "pretrain_mvitv2_s_hog_no_norm.yaml")
    over = load_config(ablation, ["model.overrides={target: pixel}"]).model.overrides
    assert over == {**load_config(ablation).model.overrides, "target": "pixel"} and over["hog_norm"] == "none"
    assert load_config(None, ["data={batch_size: 3}", "data.seed=4"]).data == DataConfig(batch_size=3, seed=4)
    # an empty mapping clears a mapping field (merging made `{}` a no-op: no key could be removed)
    assert load_config(ablation, ["model.overrides={}"]).model.overrides == {}
    extra = load_config(None, ["deepspeed.extra={zero_optimization: {overlap_comm: true}}",
                               "deepspeed.extra={zero_optimization: {}}"]).deepspeed.extra
    assert extra == {"zero_optimization": {}}
    assert load_config(None, ["train.seed=1700000000000"]).train.seed == 1700000000000  # a millisecond timestamp


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(REPO, "configs", "**", "*.yaml"), recursive=True)))
def test_every_shipped_recipe_loads(path):
    cfg = load_config(path)
    assert cfg.model.name
    from models.variants import get_variant

    # the variant exists and the recipe's model overrides are valid fields with valid values
    dataclasses.replace(get_variant(cfg.model.name), **cfg.model.overrides)


def test_every_engine_field_has_a_docstring():
    for sec in dataclasses.fields(Config):
        cls = type(getattr(Config(), sec.name))
        docs = field_docs(cls)
        missing = [f.name for f in dataclasses.fields(cls) if not docs.get(f.name)]
        assert not missing, f"{sec.name}: fields without a docstring: {missing}"
    text = describe()
    assert "optim.lr = 0.0008" in text and "absolute LR is scaled by the global batch" in text


def test_derived_values_scale_the_lr_by_the_global_batch():
    cfg = load_config(None, ["optim.lr=8e-4", "optim.lr_reference_batch=256", "data.batch_size=4",
                             "schedule.epochs=300", "schedule.warmup_epochs=10", "schedule.warmup_start_lr=8e-6",
                             "schedule.end_lr=4e-6"])
    d = derive(cfg, world_size=64, steps_per_epoch=937)
    assert d.global_batch == 256 and d.lr == pytest.approx(8e-4)
    assert (d.warmup_start_lr, d.end_lr) == (pytest.approx(8e-6), pytest.approx(4e-6))
    d = derive(cfg, world_size=8, steps_per_epoch=100)
    assert d.global_batch == 32 and d.lr == pytest.approx(1e-4)  # the official 8-GPU recipe
    # SlowFast multiplies WARMUP_START_LR and COSINE_END_LR by NUM_SHARDS with BASE_LR: the official
    # 1e-6 per 32 clips (one node) is 8e-6 per 256
    assert (d.warmup_start_lr, d.end_lr) == (pytest.approx(1e-6), pytest.approx(5e-7))
    assert d.total_steps == 30000 and d.warmup_steps == 1000 and d.run_steps == 30000
    # the defaults are that recipe's too (the schedule's were 1e-6 per 256: 8x below official)
    d = derive(load_config(None, ["data.batch_size=4"]), world_size=8, steps_per_epoch=100)
    assert (d.lr, d.warmup_start_lr, d.end_lr) == (pytest.approx(1e-4), pytest.approx(1e-6), pytest.approx(1e-6))
    text = d.describe(cfg)
    assert "0.0008 per 256 clips x 32/256 = 0.0001" in text
    with pytest.raises(ConfigError, match="0 batches per epoch"):
        derive(cfg, world_size=8, steps_per_epoch=0)
    assert derive(load_config(None, ["schedule.max_steps=7"]), 1, 10).run_steps == 7


def test_config_from_dict_rejects_non_mappings():
    with pytest.raises(ConfigError, match="mapping of sections"):
        config_from_dict([1, 2])  # type: ignore[arg-type]
    assert apply_overrides({}, ["model.overrides.img_size=32"]) == {"model": {"overrides": {"img_size": 32}}}


def test_launch_env_single_process_defaults():
    env: dict = {}
    set_ = launch_env(env)
    assert env["RANK"] == "0" and env["WORLD_SIZE"] == "1" and env["LOCAL_RANK"] == "0"
    assert env["MASTER_ADDR"] == "127.0.0.1" and int(env["MASTER_PORT"]) > 0
    assert set(set_) == {"RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"}


def test_launch_env_keeps_launcher_values_and_reads_slurm():
    env = {"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "n1", "MASTER_PORT": "1234",
           "SLURM_PROCID": "7", "SLURM_STEP_ID": "0"}
    assert launch_env(env) == {} and env["RANK"] == "3"
    env = {"SLURM_PROCID": "5", "SLURM_NTASKS": "16", "SLURM_LOCALID": "1", "SLURM_STEP_ID": "0",
           "SLURM_JOB_NODELIST": "gpu[012-015,020],login1"}
    launch_env(env)
    assert (env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"]) == ("5", "16", "1")
    assert env["MASTER_ADDR"] == "gpu012" and env["MASTER_PORT"] == "12000"  # no job id: job 0
    assert _first_slurm_host("node7") == "node7"
    assert _first_slurm_host("node[1-2]-ib,other") == "node1-ib"
    env = {"SLURM_PROCID": "0", "SLURM_NTASKS": "8", "SLURM_JOB_ID": "1234567", "SLURM_STEP_ID": "2",
           "SLURM_JOB_NODELIST": "a[3-4]"}
    launch_env(env)  # two jobs on one node (and two steps of one job) get different ports
    assert env["MASTER_ADDR"] == "a3" and env["MASTER_PORT"] == str(12000 + 8 * (1234567 % 2500) + 2)
    env = {"SLURM_PROCID": "0", "SLURM_NTASKS": "1", "SLURM_JOB_ID": "99", "SLURM_STEP_ID": "0",
           "SLURM_JOB_NODELIST": "n1"}
    launch_env(env)  # one task: a free port, the loopback address
    assert env["MASTER_ADDR"] == "127.0.0.1" and env["MASTER_PORT"] != str(12000 + 8 * 99)


def test_deepspeed_config():
    c = deepspeed_config(micro_batch=4, world_size=8, zero_stage=3, precision="bf16", gradient_clipping=0.02,
                         extra={"zero_optimization": {"overlap_comm": True}})
    assert c["train_batch_size"] == 32 and c["gradient_clipping"] == 0.02 and c["bf16"] == {"enabled": True}
    assert c["zero_optimization"]["stage"] == 3 and c["zero_optimization"]["overlap_comm"] is True
    # bf16 gradients are averaged over the ranks in fp32 (DeepSpeed's own default is bf16), unless extra says
    from deepspeed.runtime.config import get_communication_data_type

    assert get_communication_data_type(c) == torch.float32
    c = deepspeed_config(micro_batch=1, world_size=2, zero_stage=2, precision="bf16", gradient_clipping=0.0,
                         extra={"communication_data_type": "bf16"})
    assert get_communication_data_type(c) == torch.bfloat16
    assert "fp16" not in deepspeed_config(micro_batch=1, world_size=1, zero_stage=0, precision="fp32",
                                          gradient_clipping=0.0)
    with pytest.raises(ValueError, match="precision"):
        deepspeed_config(micro_batch=1, world_size=1, zero_stage=0, precision="fp8", gradient_clipping=0.0)
    assert yaml.safe_load(config_to_yaml(Config()))["deepspeed"]["zero_stage"] == 0
