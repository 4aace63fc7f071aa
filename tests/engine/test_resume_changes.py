"""Resuming with changed settings: world size, per-rank batch, ZeRO stage, a missing tag, and the
logs of the interrupted stretch (``engine.runner``, ``engine.checkpoint``, ``engine.logging``).

- the data position maps across world-size and batch changes (``runner.map_data_position``):
  every clip of the epoch is handed out, at most ``W'·b' - 1`` of them twice, checked against the
  real ``sampler.shard_positions``; ``Run.restore_rank_state`` applies it to real loaders and
  rescales the step count;
- end to end: 2 ranks with ZeRO-0 stopped after step 4 (checkpoint at 3), resumed on 1 rank: the
  dataset indices of the two runs together are exactly the epoch order once, the LR continues at
  the same fraction of training, the checkpoints record what the loader handed out, and the
  logged loss of the 2-rank run is the mean of the two ranks' losses;
- a ZeRO stage or world size DeepSpeed cannot load, and a missing tag, are config errors
  (exit code 2) naming saved and current values, raised before DeepSpeed is called;
- metrics.jsonl (and TensorBoard, by ``purge_step``) drop what was logged after the checkpoint.
"""
from __future__ import annotations

import collections
import json
import math
import os
import shutil
import sys

import numpy as np
import pytest
import torch

from tests.engine.test_train import TINY, TORCHRUN, _free_port, _losses, _run, env  # noqa: F401 (env: a fixture)

from engine.config import ConfigError
from engine.data.sampler import epoch_order, shard_positions

# python -m engine with the pre-training step wrapped: records each rank's local losses and the
# dataset indices of its batches (RECORD=<path prefix>), then runs the CLI unchanged
WRAPPER = r'''
import json, os, sys
import engine.pretrain as P

orig = P.train_loop

def wrapped(run, step_fn, **kw):
    rec = {"start_step": run.state.step, "losses": [], "indices": [], "dataset_len": len(run.loader.dataset),
           "seed": run.loader.cfg.seed}

    def fn(batch):
        loss = step_fn(batch)
        rec["losses"].append(float(loss.detach()))
        rec["indices"].append(batch["index"].tolist())
        return loss

    try:
        return orig(run, fn, **kw)
    finally:
        with open(f"{os.environ['RECORD']}_r{run.dist.rank}.json", "w") as f:
            json.dump(rec, f)

P.train_loop = wrapped
from engine.cli import main
sys.exit(main(sys.argv[1:]))
'''


def _layout(L: int, W: int, b: int, drop_last: bool, seed: int = 0, n: int = 3):
    from engine.runner import DataLayout

    return DataLayout(world_size=W, batch_size=b, epoch_length=L, dataset_len=n, seed=seed,
                      num_batches=len(shard_positions(L, 0, W, b, drop_last)))


def _handed_out(L: int, W: int, b: int, drop_last: bool, first: int, last: int) -> collections.Counter:
    """Valid epoch positions of batches [first, last) over all ranks."""
    c = collections.Counter()
    for r in range(W):
        for chunk in shard_positions(L, r, W, b, drop_last)[first:last]:
            c.update(p for p, valid in chunk if valid)
    return c


@pytest.mark.parametrize("drop_last", [False, True])
def test_mapped_position_skips_no_clip_and_repeats_fewer_than_a_batch(drop_last):
    from engine.runner import map_data_position

    L = 23
    layouts = [(1, 2), (2, 2), (1, 5), (3, 1), (2, 3), (4, 2)]
    for W, b in layouts:
        saved = _layout(L, W, b, drop_last)
        for W2, b2 in layouts:
            now = _layout(L, W2, b2, drop_last)
            everything = _handed_out(L, W2, b2, drop_last, 0, now.num_batches)  # a whole epoch of the new layout
            for k in range(saved.num_batches + 1):
                pos = map_data_position(saved, 5, k, now)
                before = _handed_out(L, W, b, drop_last, 0, k)
                if pos.epoch == 6:  # moved on: nothing of the new layout's epoch was left
                    assert pos.batches == 0
                    if k < saved.num_batches:  # (a complete epoch may have dropped other clips)
                        assert not (everything - before), (W, b, W2, b2, k)
                    continue
                assert pos.epoch == 5
                after = _handed_out(L, W2, b2, drop_last, pos.batches, now.num_batches)
                assert not (everything - before - after), (W, b, W2, b2, k)  # nothing skipped
                assert sum((before & after).values()) <= W2 * b2 - 1, (W, b, W2, b2, k)
                assert pos.mapped == ((W, b) != (W2, b2))
                assert (pos.message is not None) == pos.mapped and not pos.warning
                if (W, b) == (W2, b2):
                    assert pos.batches == k  # unchanged layout: exact


def test_unmappable_epoch_order_restarts_the_epoch_with_a_warning():
    from engine.runner import map_data_position

    saved = _layout(16, 2, 2, False, seed=0)
    pos = map_data_position(saved, 3, 2, _layout(16, 1, 2, False, seed=1))
    assert (pos.epoch, pos.batches, pos.warning) == (3, 0, True) and "seed 0" in pos.message
    pos = map_data_position(saved, 3, 2, _layout(24, 2, 2, False))  # another data.clips_per_epoch
    assert (pos.epoch, pos.batches, pos.warning) == (3, 0, True)
    pos = map_data_position(saved, 3, saved.num_batches, _layout(24, 2, 2, False))  # complete: just move on
    assert (pos.epoch, pos.batches, pos.warning) == (4, 0, False)


def _loader(env, world_size: int, batch_size: int, rank: int = 0):
    from engine.data import DataConfig, build_loader

    cfg = DataConfig(num_frames=8, crop_size=64, batch_size=batch_size, clips_per_epoch=16, num_threads=1,
                     cache_dir=env["MASKFEAT_CACHE"])
    return build_loader(cfg, "train", rank=rank, world_size=world_size)


def _run_with(loader, step: int, epoch: int, batch: int, rank: int = 0):
    from types import SimpleNamespace

    from engine.runner import Run, TrainState

    loader.epoch, loader.batches_consumed = epoch, batch
    dist = SimpleNamespace(rank=rank, device=torch.device("cpu"))
    return Run(cfg=None, dist=dist, model=None, engine=None, loader=loader, derived=None, logger=None,
               dtype=torch.float32, rng=np.random.default_rng([0, rank]),
               state=TrainState(step=step, epoch=epoch, batch_in_epoch=batch))


def _draws(run) -> tuple:
    import random

    return (tuple(run.rng.integers(0, 2 ** 30, 4)), tuple(torch.randint(0, 2 ** 30, (4,)).tolist()),
            tuple(random.getrandbits(30) for _ in range(4)))


def test_ranks_that_restore_another_ranks_state_draw_their_own_masks(env):
    # a ZeRO-0 checkpoint of 1 rank resumed on 3: ranks 1 and 2 read rank 0's state. Each must draw
    # its own masks, mixup and drop path (the audit: all three repeated rank 0's streams)
    saved = _run_with(_loader(env, 1, 2), step=5, epoch=0, batch=5).rank_state()
    assert saved["rank"] == 0
    draws = []
    for rank in (0, 1, 2, 1):
        run = _run_with(_loader(env, 3, 2, rank % 3), 0, 0, 0, rank=rank)
        run.restore_rank_state(saved)
        draws.append(_draws(run))
    for kind in range(3):
        assert len({d[kind] for d in draws[:3]}) == 3, kind  # numpy, torch and Python streams all differ
    assert draws[3] == draws[1]  # and a rerun of rank 1 draws what it drew
    # rank 0 continues its own streams exactly, as without the world size change
    expect = _run_with(_loader(env, 1, 2), 0, 0, 0)
    expect.restore_rank_state(saved)
    assert _draws(expect) == draws[0]
    g = np.random.default_rng()
    g.bit_generator.state = saved["numpy_rng"]
    assert draws[0][0] == tuple(g.integers(0, 2 ** 30, 4))


def test_restore_rank_state_maps_world_size_and_batch_changes(env, capsys):
    # 1 -> 2 ranks: epoch 0 after 5 of 8 batches (10 of 16 clips) continues at batch 2 of 4
    # (8 clips), not at epoch 1 (the audit: 5 >= 4 batches was taken for a complete epoch)
    saved = _run_with(_loader(env, 1, 2), step=5, epoch=0, batch=5).rank_state()
    for rank in (0, 1):
        run = _run_with(_loader(env, 2, 2, rank), 0, 0, 0)
        run.restore_rank_state(saved)
        assert (run.state.epoch, run.state.batch_in_epoch, run.state.step) == (0, 2, 2)
        assert (run.loader.epoch, run.loader.batches_consumed) == (0, 2)
    out = capsys.readouterr().out
    assert "continuing at batch 2 of 4 (2 clips seen again)" in out and "step 5 -> 2" in out
    # same world size, per-rank batch 2 -> 3 (the out-of-memory hint's advice, the other way):
    # 3 batches (6 clips) of epoch 1 consumed -> batch 2 of epoch 1; 16 clips per epoch = 8 steps
    # of 2 = 6 steps of 3 (the last padded), so step 8 + 3 -> 6 + 2
    saved = _run_with(_loader(env, 1, 2), step=11, epoch=1, batch=3).rank_state()
    run = _run_with(_loader(env, 1, 3), 0, 0, 0)
    run.restore_rank_state(saved)
    assert len(run.loader) == 6 and (run.state.epoch, run.state.batch_in_epoch) == (1, 2)
    assert run.state.step == 1 * 6 + 2 and run.loader.batches_consumed == 2
    # an unchanged layout keeps everything, also for a state saved before layouts were saved
    saved = _run_with(_loader(env, 1, 2), step=7, epoch=0, batch=7).rank_state()
    del saved["data_layout"]
    run = _run_with(_loader(env, 1, 2), 0, 0, 0)
    run.restore_rank_state(saved)
    assert (run.state.step, run.state.epoch, run.state.batch_in_epoch, run.loader.batches_consumed) == (7, 0, 7, 7)
    # ... but such a state cannot tell another per-rank batch: the epoch restarts, with a warning
    capsys.readouterr()
    run = _run_with(_loader(env, 1, 3), 0, 0, 0)
    run.restore_rank_state(saved)
    assert (run.state.step, run.state.epoch, run.state.batch_in_epoch, run.loader.batches_consumed) == (0, 0, 0, 0)
    err = capsys.readouterr().err
    assert "warning: resume: the checkpoint's epoch order (seed 0, 3 videos, an unknown number of" in err


# ---- checkpoint compatibility (no DeepSpeed needed: the checks run before it is called) ---------
class _FakeEngine:
    def __init__(self, stage: int):
        self.stage, self.loaded = stage, []

    def zero_optimization_stage(self) -> int:
        return self.stage

    def load_checkpoint(self, ckpt_dir, tag, **kw):
        self.loaded.append(tag)
        return os.path.join(ckpt_dir, tag), {}


def _fake_checkpoint(out: str, tag: str, world: int, stage: int) -> None:
    path = os.path.join(out, "checkpoints", tag)
    os.makedirs(path)
    for r in range(world):
        torch.save({"loader": {"world_size": world, "rank": r}}, os.path.join(path, f"engine_state_r{r:05d}.pt"))
        if stage > 0:  # DeepSpeed's optimiser shard of each rank (a tag lacking one is incomplete)
            torch.save({}, os.path.join(path, f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt"))
        if stage == 3:  # and its model shard (each rank reads its own)
            torch.save({}, os.path.join(path, f"zero_pp_rank_{r}_mp_rank_00_model_states.pt"))
    if stage < 3:
        torch.save({}, os.path.join(path, "mp_rank_00_model_states.pt"))  # DeepSpeed's, one for every rank
    with open(os.path.join(path, "config.yaml"), "w") as f:
        f.write(f"deepspeed:\n  zero_stage: {stage}\n")


def test_a_rank_missing_its_own_files_makes_a_tag_incomplete_or_damaged(tmp_path):
    """Each rank reads its own ZeRO shards: a ZeRO-3 tag without rank 1's model file counted as complete
    (the shards were counted), and a resume failed on rank 1 alone, inside DeepSpeed's loader, while the
    others waited in its gather. A rank's own files are now checked, on every rank, before DeepSpeed."""
    from engine.checkpoint import CheckpointError, available_tags, is_complete, load_checkpoint

    out = str(tmp_path)
    _fake_checkpoint(out, "step00000004", world=2, stage=3)
    _fake_checkpoint(out, "step00000008", world=2, stage=3)
    path = os.path.join(out, "checkpoints", "step00000008")
    assert is_complete(path)
    os.remove(os.path.join(path, "zero_pp_rank_1_mp_rank_00_model_states.pt"))
    assert not is_complete(path)  # (3 shards for 2 rank states passed the count)
    assert available_tags(os.path.join(out, "checkpoints")) == ["step00000004"]
    stray = os.path.join(out, "checkpoints", "step00000004", "engine_state_r00000 copy.pt")  # a desktop's duplicate
    torch.save({}, stray)
    assert available_tags(os.path.join(out, "checkpoints")) == ["step00000004"]  # (an AttributeError)
    os.remove(stray)
    # in a world of 1 (this process): its own optimiser shard cut short, or its own state missing
    _fake_checkpoint(out, "step00000010", world=1, stage=1)
    shard = os.path.join(out, "checkpoints", "step00000010", "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    with open(shard, "r+b") as f:
        f.truncate(os.path.getsize(shard) - 30)  # (the zip directory at its end is gone)
    eng = _FakeEngine(1)
    with pytest.raises(CheckpointError, match=r"step00000010 is damaged \(zero_pp_rank_0_mp_rank_00_optim_states.pt: "
                                              r"BadZipFile.*--resume step00000004"):
        load_checkpoint(eng, out, "step00000010")
    _fake_checkpoint(out, "step00000012", world=1, stage=0)
    tag = os.path.join(out, "checkpoints", "step00000012")
    os.replace(os.path.join(tag, "engine_state_r00000.pt"), os.path.join(tag, "engine_state_r00001.pt"))
    with pytest.raises(CheckpointError, match=r"step00000012 is damaged \(engine_state_r00000.pt: FileNotFoundError: "
                                              r"this rank's state is missing"):
        load_checkpoint(_FakeEngine(0), out, "step00000012")  # (another rank's state was read in its place)
    assert eng.loaded == []  # DeepSpeed was never asked


def test_incompatible_or_missing_checkpoints_are_config_errors(tmp_path):
    from engine.checkpoint import load_checkpoint

    out = str(tmp_path)
    _fake_checkpoint(out, "step00000003", world=2, stage=1)
    _fake_checkpoint(out, "step00000012", world=2, stage=2)
    _fake_checkpoint(out, "best", world=2, stage=0)
    os.makedirs(os.path.join(out, "checkpoints", ".tmp-step00000015"))  # never offered
    eng = _FakeEngine(1)
    with pytest.raises(ConfigError, match=r"no checkpoint 'step00000009'.*"
                                          r"available: step00000003, step00000012, best \("):
        load_checkpoint(eng, out, "step00000009")
    # this process is a world of 1: the ZeRO-1 checkpoint of 2 ranks cannot load
    with pytest.raises(ConfigError, match=r"saved by 2 rank\(s\) with deepspeed.zero_stage=1, this run has 1.*"
                                          r"Resume with 2 rank\(s\).*maskfeat export"):
        load_checkpoint(eng, out, "step00000003")
    with pytest.raises(ConfigError, match=r"saved with deepspeed.zero_stage=2, this run has deepspeed.zero_stage=3"):
        load_checkpoint(_FakeEngine(3), out, "step00000012")
    with pytest.raises(ConfigError, match=r"zero_stage=0, this run has deepspeed.zero_stage=1"):
        load_checkpoint(eng, out, "best")
    assert eng.loaded == []  # DeepSpeed was never asked
    # what DeepSpeed can load goes through: ZeRO-0 into another world size, ZeRO-1 <-> ZeRO-2
    eng0 = _FakeEngine(0)
    assert load_checkpoint(eng0, out, "best")["loader"]["rank"] == 0 and eng0.loaded == ["best"]
    from engine.checkpoint import check_resume_compatible

    check_resume_compatible("x/step1", saved_world=4, saved_stage=2, world_size=4, zero_stage=1)
    check_resume_compatible("x/step1", saved_world=4, saved_stage=None, world_size=2, zero_stage=0)


def test_resume_drops_the_logs_of_the_interrupted_stretch(tmp_path, capsys):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from engine.logging import RunLogger

    out = str(tmp_path)
    log = RunLogger(out, enabled=True, total_steps=6, progress_bar=False, tensorboard=True)
    for s in range(1, 7):
        log.scalars(s, {"loss": float(s)})
    log.scalars(3, {"top1": 50.0}, prefix="val")
    log.close()
    with open(os.path.join(out, "metrics.jsonl"), "a") as f:
        f.write('{"step": 7, "split": "tr')  # killed while writing
    log = RunLogger(out, enabled=True, total_steps=6, progress_bar=False, tensorboard=True, resume_step=3)
    assert "dropped 4 records after step 3" in capsys.readouterr().err
    log.scalars(4, {"loss": 40.0})
    log.close()
    recs = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    assert [(r["step"], r["split"]) for r in recs] == [(1, "train"), (2, "train"), (3, "train"), (3, "val"),
                                                        (4, "train")]
    assert recs[-1]["loss"] == 40.0
    acc = EventAccumulator(os.path.join(out, "tb"))
    acc.Reload()
    assert [(e.step, e.value) for e in acc.Scalars("train/loss")] == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 40.0)]


def test_logs_are_dropped_by_epoch_across_a_step_rescale(tmp_path):
    """After a resume with another global batch the step numbers change unit: records of the old
    unit numbered above a later checkpoint's step were trained before it. Dropping by step lost them
    (epochs 2.5-3.0 here); by epoch, only the interrupted stretch goes. The final evaluation's check
    matched an old-unit validation at the same step number (another point of training)."""
    from engine.config import load_config
    from engine.finetune import evaluated_at
    from engine.logging import truncate_metrics

    path = tmp_path / "metrics.jsonl"
    old = [(s, s / 4) for s in range(1, 13)]  # batch 2: 4 steps per epoch, checkpoint at step 12 (epoch 3)
    new = [(s, s / 2) for s in range(7, 11)]  # batch 4: 2 per epoch, step 12 -> 6, then steps 7..10
    lines = [{"step": s, "split": "train", "epoch": e} for s, e in old + new]
    lines.insert(8, {"step": 8, "split": "val", "epoch": 2.0, "top1": 10.0})  # old unit's epoch-2 evaluation
    path.write_text("".join(json.dumps(r) + "\n" for r in lines))
    # resumed from new-unit step 8 (epoch 4.0): steps 9, 10 of the new unit ran after it
    assert truncate_metrics(str(path), 8, 4.0) == 2
    kept = [(r["step"], r["epoch"]) for r in map(json.loads, path.read_text().splitlines()) if r["split"] == "train"]
    assert kept == old + [(7, 3.5), (8, 4.0)]
    cfg = load_config(TINY, [f"train.output_dir={tmp_path}"])
    assert not evaluated_at(cfg, 8, 4.0) and evaluated_at(cfg, 8, 2.0) and evaluated_at(cfg, 8)  # (by step: old)
    # a record cut before its newline parses, but the next append would join it: dropped, whatever its step
    with open(path, "a") as f:
        f.write(json.dumps({"step": 1, "split": "train", "epoch": 0.25}))
    assert truncate_metrics(str(path), 8, 4.0) == 1 and path.read_text().endswith("\n")


# ---- end to end: 2 ranks -> 1 rank, ZeRO-0 ------------------------------------------------------
SETTINGS = ["-c", TINY, "data.clips_per_epoch=16", "schedule.max_steps=8", "deepspeed.zero_stage=0"]


@pytest.fixture(scope="module")
def two_rank_run(env, tmp_path_factory):
    """2 ranks x 2 clips, 4 steps per epoch, checkpoint at step 3, killed after step 4."""
    tmp = tmp_path_factory.mktemp("resume2")
    wrapper = tmp / "wrapper.py"
    wrapper.write_text(WRAPPER)
    out = str(tmp / "run")
    e = dict(env, RECORD=str(tmp / "first"))
    p = _run([TORCHRUN, "--nproc_per_node", "2", "--master_port", str(_free_port()), str(wrapper), "pretrain",
              *SETTINGS, f"train.output_dir={out}", "train.checkpoint_every_steps=3", "train.stop_after_steps=4"],
             e, timeout=400, ok=(1,))  # torchrun: 1 when its children fail (here: exit 3, stopped)
    assert "world size          2" in p.stdout and "stopped after step 4" in p.stderr
    return tmp, out


def _read(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


def test_two_ranks_resumed_on_one_rank_continue_the_epoch(env, two_rank_run, tmp_path):
    from engine.optim import lr_at_step

    tmp, first_out = two_rank_run
    out = str(tmp_path / "run")
    shutil.copytree(first_out, out)
    first = [_read(f"{tmp}/first_r{r}.json") for r in (0, 1)]
    # the logged loss of 2 ranks is the mean over the global batch, not rank 0's own
    logged = dict(_losses(out))
    assert sorted(logged) == [1, 2, 3, 4]
    for s in (1, 2, 3, 4):
        local = [first[r]["losses"][s - 1] for r in (0, 1)]
        assert local[0] != local[1]
        assert math.isclose(logged[s], (local[0] + local[1]) / 2, rel_tol=1e-6), (s, logged[s], local)

    wrapper = str(tmp / "wrapper.py")
    e = dict(env, RECORD=str(tmp_path / "second"))
    p = _run([sys.executable, wrapper, "pretrain", *SETTINGS, f"train.output_dir={out}",
              "train.checkpoint_every_steps=7", "--resume", "auto"], e)
    # 3 batches x 2 ranks x 2 clips = 12 of 16 clips -> batch 6 of 8 with 1 rank x 2 clips
    assert "12 of 16 clips of epoch 0 consumed with 2 rank(s) x 2 per batch (3 batches); with 1 x 2 " \
           "continuing at batch 6 of 8 (0 clips seen again); step 3 -> 6" in p.stdout, p.stdout
    second = _read(f"{tmp_path}/second_r0.json")
    assert second["start_step"] == 6 and len(second["indices"]) == 2  # steps 7 and 8
    # the epoch order exactly once: steps 1-3 of both ranks, then steps 7-8 of the single rank
    seen = collections.Counter()
    for r in (0, 1):
        for idx in first[r]["indices"][:3]:
            seen.update(idx)
    for idx in second["indices"]:
        seen.update(idx)
    order = epoch_order(first[0]["dataset_len"], 0, first[0]["seed"], length=16)
    assert seen == collections.Counter(order.tolist())
    # bookkeeping = what the loader handed out; a further resume would start at the right place
    st7 = torch.load(os.path.join(out, "checkpoints", "step00000007", "engine_state_r00000.pt"), weights_only=False)
    assert st7["train_state"]["batch_in_epoch"] == 7 and st7["loader"]["batches_consumed"] == 7
    assert st7["data_layout"]["world_size"] == 1 and st7["data_layout"]["batch_size"] == 2
    st8 = torch.load(os.path.join(out, "checkpoints", "step00000008", "engine_state_r00000.pt"), weights_only=False)
    assert (st8["train_state"]["epoch"], st8["train_state"]["batch_in_epoch"], st8["loader"]["epoch"]) == (1, 0, 1)
    # metrics: step 4 (after the checkpoint, before the kill) is dropped; the LR continues at the
    # same fraction of training, in steps of the new global batch (8 per epoch, peak LR for 2 clips)
    recs = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    assert [r["step"] for r in recs] == [1, 2, 3, 7, 8]
    sched = dict(epochs=2, warmup_epochs=0.5, warmup_start_lr=1e-6 * 2 / 4, end_lr=1e-6 * 2 / 4)  # scaled like the LR
    for r in recs[3:]:
        assert math.isclose(r["lr"], lr_at_step(r["step"] - 1, 8, peak_lr=1e-3 * 2 / 4, **sched), rel_tol=1e-9)
        assert math.isclose(r["epoch"], r["step"] / 8)
    assert math.isclose(recs[2]["epoch"], 3 / 4)  # old steps: 4 per epoch


def test_resume_with_another_zero_stage_exits_2_naming_both(env, two_rank_run, tmp_path):
    _, first_out = two_rank_run
    out = str(tmp_path / "run")
    shutil.copytree(first_out, out)
    p = _run([sys.executable, "-m", "engine", "pretrain", *SETTINGS[:-1], "deepspeed.zero_stage=3",
              f"train.output_dir={out}", "--resume", "auto"], env, ok=(2,))
    assert "config error" in p.stderr and "Traceback" not in p.stderr
    assert "saved with deepspeed.zero_stage=0, this run has deepspeed.zero_stage=3" in p.stderr


def test_resume_with_a_larger_batch_sets_aside_the_tags_its_steps_would_overwrite(env, tmp_path):
    """Going back to step 3 of batch 2 with batch 4 continues at step 1 of the new unit: its saves at
    steps 2, 3, ... used to overwrite the old tags of those numbers, the resumed one included."""
    out = str(tmp_path / "run")
    common = ["-c", TINY, f"train.output_dir={out}", "train.checkpoint_every_steps=1", "train.keep_checkpoints=0"]
    _run([sys.executable, "-m", "engine", "pretrain", *common, "schedule.max_steps=4"], env)
    ck = os.path.join(out, "checkpoints")
    # killed before its first save: the tag it resumed from is still where --resume auto finds it
    _run([sys.executable, "-m", "engine", "pretrain", *common, "data.batch_size=4", "train.checkpoint_every_steps=0",
          "train.stop_after_steps=2", "--resume", "step00000003"], env, ok=(3,))
    assert open(os.path.join(ck, "latest")).read().strip() == "step00000003"
    p = _run([sys.executable, "-m", "engine", "pretrain", *common, "data.batch_size=4", "schedule.max_steps=3",
              "--resume", "auto"], env)
    assert "resumed from" in p.stdout and "step00000003 at step 1 " in p.stdout, p.stdout[-2000:]

    def batch(tag):
        st = torch.load(os.path.join(ck, tag, "engine_state_r00000.pt"), weights_only=False)
        return st["data_layout"]["batch_size"]

    assert [batch(t) for t in ("step00000002", "step00000003")] == [4, 4]  # this run's
    assert [batch(t) for t in ("step00000002.superseded", "step00000003.superseded", "step00000004.superseded")] == [2, 2, 2]
