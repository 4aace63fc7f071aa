"""Resuming with changed optimiser settings or precision (``engine.runner.reapply_optimizer_settings``,
``engine.checkpoint.check_param_groups``, ``engine.checkpoint.check_resume_compatible``).

- regression: a changed ``optim.weight_decay``/``betas``/``eps``/``layer_decay`` and
  ``deepspeed.gradient_clipping`` were announced as "continuing with the new values", but torch's
  ``Optimizer.load_state_dict`` (and ZeRO-1/2's saved ``clip_grad``) put the saved ones back: the
  next checkpoint still held the old settings;
- regression: a change that alters the AdamW grouping (``optim.layer_decay`` to 1,
  ``optim.weight_decay`` to 0) crashed inside DeepSpeed (ZeRO-0: "loaded state dict has a different
  number of parameter groups"; ZeRO-1: a parameter-alignment error) without naming the key: now a
  config error (exit 2) naming it and the saved value;
- regression: a changed ``deepspeed.precision`` crashed (ZeRO-0 fp32 -> bf16: KeyError
  'dynamic_loss_scale'; ZeRO-1: "data error: No such file ... bf16_zero_pp_rank_0_...", exit 5):
  now a config error naming both precisions.
"""
from __future__ import annotations

import math
import os
import shutil
import sys

import pytest
import torch

from tests.engine.test_train import TINY, _run, env  # noqa: F401 (env: a fixture)

from engine.config import ConfigError

SETTINGS = {0: ["deepspeed.zero_stage=0"], 1: ["deepspeed.zero_stage=1", "optim.layer_decay=0.75"]}
"""Each module run's own settings (ZeRO stage; the ZeRO-1 run has layer decay), repeated on resume."""


@pytest.fixture(scope="module")
def runs(env, tmp_path_factory):
    """Two finished 2-step runs: ZeRO-0 (weight decay 0.05, no layer decay) and ZeRO-1 with layer decay 0.75."""
    tmp = tmp_path_factory.mktemp("resume_optim")
    out = {stage: str(tmp / f"zero{stage}") for stage in SETTINGS}
    for stage, settings in SETTINGS.items():
        _run([sys.executable, "-m", "engine", "pretrain", "-c", TINY, "schedule.max_steps=2", *settings,
              f"train.output_dir={out[stage]}"], env)
    return out


def _resume(env, runs, stage: int, dst: str, *overrides: str, ok=(0,)):
    """``--resume auto`` of a copy of the ZeRO-``stage`` run with its settings and ``overrides`` (later wins)."""
    shutil.copytree(runs[stage], dst)
    return _run([sys.executable, "-m", "engine", "pretrain", "-c", TINY, f"train.output_dir={dst}",
                 "schedule.max_steps=3", *SETTINGS[stage], *overrides, "--resume", "auto"], env, ok=ok)


def _zero1_groups(out: str, tag: str) -> tuple[list[dict], float]:
    """The AdamW groups and the gradient clip a ZeRO-1 checkpoint of one rank holds."""
    sd = torch.load(os.path.join(out, "checkpoints", tag, "zero_pp_rank_0_mp_rank_00_optim_states.pt"),
                    map_location="cpu", weights_only=False)["optimizer_state_dict"]
    return sd["base_optimizer_state"]["param_groups"], float(sd["clip_grad"])


def test_changed_optimizer_settings_take_effect_on_resume(env, runs, tmp_path):
    out = str(tmp_path / "run")
    p = _resume(env, runs, 1, out, "optim.layer_decay=0.9", "optim.weight_decay=0.1", "optim.betas=[0.8,0.95]", "optim.eps=1e-6",
                "deepspeed.gradient_clipping=0.5")
    assert "optim.weight_decay: 0.05 -> 0.1" in p.stderr and "continuing with the new values" in p.stderr
    before, clip_before = _zero1_groups(out, "step00000002")
    after, clip_after = _zero1_groups(out, "step00000003")
    assert clip_before == 0.02 and clip_after == 0.5
    assert len(after) == len(before) > 2  # one pair of groups per layer
    for old, new in zip(before, after):
        k = round(math.log(old["lr_scale"]) / math.log(0.75))  # the layer's distance from the top
        assert math.isclose(new["lr_scale"], 0.9 ** k, rel_tol=1e-12), (old["lr_scale"], new["lr_scale"])
        assert new["weight_decay"] == (0.1 if old["weight_decay"] else 0.0)
        assert tuple(new["betas"]) == (0.8, 0.95) and new["eps"] == 1e-6


@pytest.mark.parametrize("stage, change, named, keep", [
    (0, "optim.weight_decay=0", "optim.weight_decay: 0.05 -> 0.0", "optim.weight_decay=0.05"),
    (1, "optim.layer_decay=1.0", "optim.layer_decay: 0.75 -> 1.0", "optim.layer_decay=0.75"),
])
def test_another_adamw_grouping_on_resume_exits_2_naming_the_key(env, runs, tmp_path, stage, change, named, keep):
    p = _resume(env, runs, stage, str(tmp_path / "run"), change, ok=(2,))
    assert "config error" in p.stderr and "Traceback" not in p.stderr
    assert "holds the optimiser state of" in p.stderr and f"({named}): " in p.stderr, p.stderr[-2000:]
    assert f"Resume with {keep}. " in p.stderr


@pytest.mark.parametrize("stage", [0, 1])
def test_another_precision_on_resume_exits_2_naming_both(env, runs, tmp_path, stage):
    p = _resume(env, runs, stage, str(tmp_path / "run"), "deepspeed.precision=bf16", ok=(2,))
    assert "config error" in p.stderr and "Traceback" not in p.stderr and "data error" not in p.stderr
    assert ("saved with deepspeed.precision=fp32, this run has deepspeed.precision=bf16" in p.stderr
            and "Resume with deepspeed.precision=fp32" in p.stderr), p.stderr[-2000:]


def test_precision_check_runs_before_deepspeed(tmp_path):
    from engine.checkpoint import check_resume_compatible

    # the export hint names the tag folder itself (it named this run's train.output_dir, where a checkpoint
    # continued from another run is not)
    with pytest.raises(ConfigError, match=r"deepspeed.precision=bf16, this run has deepspeed.precision=fp32.*maskfeat "
                                          r"export x/step1 --out backbone.safetensors`"):
        check_resume_compatible("x/step1", saved_world=1, saved_stage=0, world_size=1, zero_stage=0,
                                saved_precision="bf16", precision="fp32")
    check_resume_compatible("x/step1", saved_world=1, saved_stage=0, world_size=1, zero_stage=0,
                            saved_precision="bf16", precision="bf16")
    check_resume_compatible("x/step1", saved_world=1, saved_stage=0, world_size=1, zero_stage=0,
                            saved_precision=None, precision="bf16")  # an unreadable config.yaml: not checked


def test_finetune_resuming_a_pretraining_checkpoint_says_to_export_it(env, runs, tmp_path):
    """``maskfeat finetune --resume <a pre-training run>`` was refused as a change of AdamW grouping, with
    the advice to resume "with the saved optim settings", which were the ones given: the checkpoint
    is of another kind of model. Said so, with the export that fine-tunes from it."""
    p = _run([sys.executable, "-m", "engine", "finetune", "-c", TINY, f"train.output_dir={tmp_path / 'ft'}",
              "--resume", runs[0]], env, ok=(2,))
    tag = os.path.join(runs[0], "checkpoints", "step00000002")
    assert (f"checkpoint {tag} is a pre-training checkpoint, and this run trains a fine-tuning model" in p.stderr
            and f"maskfeat export {tag} --out backbone.safetensors" in p.stderr), p.stderr[-2000:]
    assert "AdamW parameter groups" not in p.stderr
    # said first: it printed "resuming ...: finetune.pretrained is not read" and "continuing checkpoint ... of
    # another run", then built the model
    assert "resum" not in p.stdout and "continuing checkpoint" not in p.stdout, p.stdout[-2000:]
