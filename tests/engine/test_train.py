"""The engine end to end on CPU: real demo clips through the loader, DeepSpeed with gloo.

Each run is a fresh process (``python -m engine`` or ``torchrun``), as a user would launch it:
- exact resume: a run killed after step k (``train.stop_after_steps``) and resumed with
  ``--resume auto`` reproduces the losses of an uninterrupted run bit for bit (fp32, ZeRO-1);
  a half-written (temporary) checkpoint is never picked;
- 2 ranks x ZeRO-1/2/3: pre-training, export of the consolidated backbone, fine-tuning from it
  with multi-view evaluation; the three stages give the same losses;
- a multi-node launch simulated as 2 nodes x 1 process on loopback (two ``torchrun`` with
  ``--nnodes 2`` and one rendezvous endpoint), and the ``deepspeed`` launcher on one node (its
  hostfile mode needs ssh between hosts, which this machine lacks);
- non-finite losses are skipped and counted, and too many in a row stop the run;
- a fixed batch is overfit; config errors from the command line are clear (exit code 2).
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = os.path.join(REPO, "tests", "engine", "tiny.yaml")
DRIVER = os.path.join(REPO, "tests", "engine", "driver.py")
TORCHRUN = os.path.join(os.path.dirname(sys.executable), "torchrun")


@pytest.fixture(scope="session")
def env(tmp_path_factory):
    """Environment of the child processes: the demo clips prepared once in a session cache."""
    cache = str(tmp_path_factory.mktemp("maskfeat_cache"))
    from engine.data import demo_dataset

    demo_dataset(os.path.join(cache, "demo"))
    e = dict(os.environ)
    extra = os.environ.get("PYTHONPATH")  # keeps packages carried to a GPU machine (bench/gpu_wheels) importable
    e.update(MASKFEAT_CACHE=cache, PYTHONPATH=REPO + (os.pathsep + extra if extra else ""), OMP_NUM_THREADS="1",
             TORCH_EXTENSIONS_DIR=str(tmp_path_factory.mktemp("torch_ext")))
    if not torch.cuda.is_available():
        e["TRITON_INTERPRET"] = "1"
    return e


def _run(cmd, env, timeout=300, ok=(0,)):
    p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    if p.returncode not in ok:
        raise AssertionError(f"{' '.join(cmd)} -> {p.returncode}\n--- stdout\n{p.stdout[-4000:]}\n--- stderr\n{p.stderr[-6000:]}")
    return p


def _losses(out_dir):
    steps = []
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        for line in f:
            r = json.loads(line)
            if r["split"] == "train":
                steps.append((r["step"], r["loss"]))
    return steps


def _val_steps(out_dir):
    """The steps of the validation records of a run's metrics.jsonl."""
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return [r["step"] for r in map(json.loads, f) if r["split"] == "val"]


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_resume_auto_reproduces_an_uninterrupted_run_exactly(env, tmp_path):
    common = [sys.executable, "-m", "engine", "pretrain", "-c", TINY, "schedule.max_steps=6",
              "train.checkpoint_every_steps=3", "deepspeed.zero_stage=1"]
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    _run(common + [f"train.output_dir={a}"], env)
    p = _run(common + [f"train.output_dir={b}", "train.stop_after_steps=4"], env, ok=(3,))
    assert "stopped after step 4" in p.stderr
    ck = os.path.join(b, "checkpoints")
    assert "the last complete checkpoint is step00000003 (rerun with --resume auto" in p.stderr  # as Ctrl-C says
    assert sorted(t for t in os.listdir(ck) if not t.endswith(".py")) == ["latest", "step00000003"]
    # a save that died half-way (a temporary tag, here with every file of a tag) must never be resumed from
    shutil.copytree(os.path.join(ck, "step00000003"), os.path.join(ck, ".tmp-step00000005"))
    p = _run(common + [f"train.output_dir={b}", "--resume", "auto"], env)
    assert "resumed from" in p.stdout and "step00000003 at step 3 (epoch 0, batch 3)" in p.stdout
    assert "done: step 6 (3 trained in this run) in " in p.stdout  # (it said "6 steps" for the 3 it ran)
    la, lb = _losses(a), _losses(b)
    assert [s for s, _ in la] == [1, 2, 3, 4, 5, 6]
    assert [s for s, _ in lb] == [1, 2, 3, 4, 5, 6]  # step 4, logged before the kill, is dropped on resume
    after = dict(lb[3:])
    for step in (4, 5, 6):
        assert after[step] == dict(la)[step], f"step {step}: {after[step]!r} != {dict(la)[step]!r}"
    assert len({l for _, l in la}) == 6  # the losses really change from step to step
    assert open(os.path.join(ck, "latest")).read().strip() == "step00000006"
    assert os.path.isfile(os.path.join(ck, "step00000006", "config.yaml"))


def test_two_rank_zero_3_bf16_resume_mid_epoch_is_exact(env, tmp_path):
    """The exact-resume check on 2 ranks with ZeRO-3 in bf16 and a mid-epoch checkpoint (each rank's own
    shards, data positions and mask streams): the same losses, LR and consolidated weights as a run that
    was not stopped. (Covered on one rank with ZeRO-1 only.)"""
    from engine.checkpoint import checkpoint_dir, consolidated_state_dict

    common = ["-m", "engine", "pretrain", "-c", TINY, "schedule.epochs=5", "schedule.max_steps=5",
              "train.checkpoint_every_steps=3", "deepspeed.zero_stage=3", "deepspeed.precision=bf16"]  # 2 steps an epoch
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    run = lambda *args, ok=(0,): _run([TORCHRUN, "--nproc_per_node", "2", "--master_port", str(_free_port()),  # noqa: E731
                                       *common, *args], env, timeout=400, ok=ok)
    run(f"train.output_dir={a}")
    run(f"train.output_dir={b}", "train.stop_after_steps=4", ok=(1,))  # (torchrun: 1 when its children exit 3)
    p = run(f"train.output_dir={b}", "--resume", "auto")
    assert "step00000003 at step 3" in p.stdout, p.stdout[-2000:]
    records = {}
    for out in (a, b):
        with open(os.path.join(out, "metrics.jsonl")) as f:
            records[out] = [(r["step"], r["loss"], r["lr"]) for r in map(json.loads, f) if r["split"] == "train"]
    assert [r[0] for r in records[a]] == [1, 2, 3, 4, 5] and records[b] == records[a]
    wa, wb = (consolidated_state_dict(checkpoint_dir(out), "step00000005") for out in (a, b))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_a_stop_at_the_end_of_an_epoch_keeps_the_checkpoint_due_there(env, tmp_path):
    """A step checkpoint that falls on an epoch's last step is saved after the epoch's bookkeeping;
    train.stop_after_steps at that step stopped before it (no tag at all), unlike a kill there."""
    out = str(tmp_path / "run")
    common = [sys.executable, "-m", "engine", "pretrain", "-c", TINY, f"train.output_dir={out}", "schedule.max_steps=8",
              "train.checkpoint_every_steps=4"]  # 4 steps per epoch
    p = _run(common + ["train.stop_after_steps=4"], env, ok=(3,))
    assert "stopped after step 4" in p.stderr
    assert open(os.path.join(out, "checkpoints", "latest")).read().strip() == "step00000004"
    p = _run(common + ["--resume", "auto"], env)
    assert "step00000004 at step 4 (epoch 1, batch 0)" in p.stdout, p.stdout[-2000:]


def test_sigterm_saves_the_step_it_comes_in_then_stops(env, tmp_path):
    """A scheduler's SIGTERM (preemption, the time limit) stopped at once: everything since the last
    checkpoint was lost (up to train.checkpoint_every_steps steps on every GPU). It now ends the step
    it comes in, saves it, exits 143 naming the tag, and --resume auto continues from there."""
    import signal

    out = str(tmp_path / "run")
    cmd = [sys.executable, "-m", "engine", "pretrain", "-c", TINY, f"train.output_dir={out}", "schedule.epochs=100",
           "schedule.max_steps=400"]  # no scheduled checkpoint before the end (tiny: checkpoint_every_epochs 0)
    p = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    try:
        for line in p.stdout:
            lines.append(line)
            if " step 3/400 " in line:
                p.send_signal(signal.SIGTERM)
                break
        lines += p.stdout.readlines()
        assert p.wait(timeout=120) == 143, "".join(lines[-40:])
    finally:
        p.kill()
    text = "".join(lines)
    assert "SIGTERM: saving a checkpoint after this step, then stopping" in text
    latest = open(os.path.join(out, "checkpoints", "latest")).read().strip()
    step = int(latest[len("step"):])
    assert 3 <= step < 400 and (f"terminated (SIGTERM) after saving {latest}, the step it came in (or the next, "
                                f"after that step's forward pass); the last complete checkpoint is {latest}") in text
    assert os.listdir(os.path.join(out, "checkpoints")) == ["latest", latest]
    p = _run(cmd[:-1] + [f"schedule.max_steps={step + 2}", "--resume", "auto"], env)
    assert f"{latest} at step {step}" in p.stdout, p.stdout[-2000:]


def test_a_signal_during_an_epoch_save_stops_before_the_evaluation(env, tmp_path):
    """A SIGTERM that came while the epoch's checkpoint was written was taken only after that epoch's
    evaluation (a Kinetics-size one outlasts the scheduler's grace period); during the final save,
    the final evaluation ran first. Both now stop at once after the save; a resume evaluates."""
    common = ["data.num_clips=1", "schedule.max_steps=8", "train.checkpoint_every_epochs=1",
              "train.eval_every_epochs=1"]  # 4 steps per epoch: saves step 4, best (its evaluation), step 8 (final)
    out = str(tmp_path / "s2")  # during the evaluation (its `best`): at once, the epoch being saved
    p = _run([sys.executable, DRIVER, "signal_in_save", out, *common], {**env, "SIGNAL_SAVE": "2"}, ok=(143,))
    assert "terminated (SIGTERM); the last complete checkpoint is step00000004" in p.stderr, p.stderr[-3000:]
    for at, step in ((1, 4), (3, 8)):
        out = str(tmp_path / f"s{at}")
        p = _run([sys.executable, DRIVER, "signal_in_save", out, *common], {**env, "SIGNAL_SAVE": str(at)}, ok=(143,))
        assert f"terminated (SIGTERM) after saving step{step:08d}" in p.stderr, p.stderr[-3000:]
        assert _val_steps(out) == [s for s in (4,) if s < step]  # the evaluation of the saved step did not begin
        p = _run([sys.executable, "-m", "engine", "finetune", "-c", TINY, f"train.output_dir={out}", *common,
                  "--resume", "auto"], env)
        assert _val_steps(out) == [4, 8], p.stdout[-2000:]  # the resume evaluates it first, then goes on


def test_a_signal_during_a_mid_epoch_save_stops_without_another_step(env, tmp_path):
    """A SIGTERM during a train.checkpoint_every_steps save was seen at the next step: one more step and
    a second save, which a large model's grace period (SLURM's KillWait) may not hold."""
    out = str(tmp_path / "mid")
    p = _run([sys.executable, DRIVER, "signal_in_save", out, "data.num_clips=1", "schedule.max_steps=8",
              "train.checkpoint_every_steps=2"], {**env, "SIGNAL_SAVE": "1"}, ok=(143,))
    assert "terminated (SIGTERM) after saving step00000002" in p.stderr, p.stderr[-3000:]


def test_signal_handler_asks_inside_the_loop_and_stops_outside():
    import signal

    from engine import signals

    with pytest.raises(signals.Terminated) as e:
        signals.handle(signal.SIGTERM, None)  # outside a training loop: at once
    assert e.value.exit_code == 143 and e.value.name == "SIGTERM"
    signals.handle(signal.SIGTERM, None)  # its copy (the launcher's) while the run unwinds: ignored
    with pytest.raises(signals.Terminated):
        signals.handle(signal.SIGUSR1, None)  # another signal: at once
    signals._state["raised_at"] -= signals.REPEAT_S
    with pytest.raises(signals.Terminated):
        signals.handle(signal.SIGUSR1, None)  # the same later: at once
    with signals.save_on_signal():
        assert signals.requested() == 0
        signals.handle(signal.SIGUSR1, None)  # the first: a request
        assert signals.requested() == signal.SIGUSR1
        signals.handle(signal.SIGUSR1, None)  # its copy from the launcher (torchrun forwards it): the same
        with pytest.raises(signals.Terminated) as e:
            signals.handle(signal.SIGTERM, None)  # another signal: at once
        assert e.value.exit_code == 143
    with signals.save_on_signal():
        signals.handle(signal.SIGTERM, None)
        signals._state["at"] -= signals.REPEAT_S  # the same signal again, later: at once
        with pytest.raises(signals.Terminated):
            signals.handle(signal.SIGTERM, None)
    with signals.save_on_signal():
        with signals.immediate(), pytest.raises(signals.Terminated):  # an evaluation between epochs
            signals.handle(signal.SIGTERM, None)
        signals.handle(signal.SIGTERM, None)
        assert signals.requested() == signal.SIGTERM
    assert signals.requested() == 0
    signals.handle(signal.SIGTERM, None)  # the launcher's copy, after the loop stopped on the first: ignored
    signals.reset()  # (a run starting afresh: cli.main; an in-process SIGTERM test after this one was swallowed)
    with pytest.raises(signals.Terminated):
        signals.handle(signal.SIGTERM, None)
    signals.reset()


def test_two_ranks_zero_1_2_3_pretrain_export_finetune(env, tmp_path):
    from models.checkpoint import load_backbone_into_classifier
    from models.variants import create_model
    from safetensors.torch import load_file

    results = {}
    for stage in (1, 2, 3):
        out = str(tmp_path / f"z{stage}")
        _run([TORCHRUN, "--nproc_per_node", "2", "--master_port", str(_free_port()), DRIVER, "zero", out,
              f"deepspeed.zero_stage={stage}"], env, timeout=400)
        with open(os.path.join(out, "result_r0.json")) as f:
            results[stage] = json.load(f)
        r = results[stage]
        assert r["world"] == 2
        assert r["eval"]["videos"] == 3 and r["eval"]["views"] == 6  # 3 demo videos x 2 clips
        assert 0 <= r["eval"]["top1"] <= r["eval"]["top5"] <= 100
        if stage == 1:  # the same weights evaluated in one process: the same per-video probabilities
            _run([sys.executable, "-m", "engine", "eval", "-c", TINY, f"train.output_dir={out}/ft", "data.num_clips=2",
                  "--checkpoint", f"{out}/ft", "--save-predictions"], env)
            one, two = (np.load(os.path.join(out, f)) for f in ("ft/eval.predictions.npz", "predictions_2ranks.npz"))
            assert np.array_equal(one["video"], two["video"]) and len(one["video"]) == 3
            np.testing.assert_allclose(two["probs"], one["probs"], rtol=1e-5, atol=1e-6)
        assert os.path.isdir(os.path.join(out, "ft", "checkpoints", "best"))
        shards = os.listdir(os.path.join(out, "pre", "checkpoints", "step00000003"))
        assert any("zero_pp_rank_1" in s for s in shards), shards  # really partitioned over 2 ranks
        # the consolidated backbone loads into the fine-tuning model: only the head is new
        sd = load_file(os.path.join(out, "backbone.safetensors"))
        assert not any(k.startswith(("mask_token", "pred_head.")) for k in sd)
        clf = create_model("mvitv2_tiny", task="classify", num_classes=3, num_frames=8, img_size=64)
        report = load_backbone_into_classifier(clf, sd)
        assert not report.unexpected
        assert all(k.startswith(("norm.", "head.")) for k in report.missing), report.missing
        for k, v in sd.items():
            if k not in report.resized:
                assert torch.equal(clf.state_dict()[k], v), k
    l1 = [results[1]["pre_losses"][str(s)] for s in (1, 2, 3)]
    for stage in (2, 3):
        ls = [results[stage]["pre_losses"][str(s)] for s in (1, 2, 3)]
        np.testing.assert_allclose(ls, l1, rtol=1e-5, err_msg=f"ZeRO-{stage} vs ZeRO-1")


def test_multi_node_launch_simulated_on_loopback(env, tmp_path):
    port = _free_port()
    out = str(tmp_path / "mn")
    procs = []
    for node in (0, 1):
        cmd = [TORCHRUN, "--nnodes", "2", "--nproc_per_node", "1", "--node_rank", str(node),
               "--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{port}", "--rdzv_id", "maskfeat-test",
               "-m", "engine", "pretrain", "-c", TINY, f"train.output_dir={out}", "deepspeed.zero_stage=2",
               "schedule.max_steps=2"]
        procs.append(subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (o, e) in zip(procs, outs):
        assert p.returncode == 0, f"--- stdout\n{o[-3000:]}\n--- stderr\n{e[-5000:]}"
    assert "world size          2" in outs[0][0]
    tag = os.path.join(out, "checkpoints", "step00000002")
    files = os.listdir(tag)
    assert any("zero_pp_rank_0" in f for f in files) and any("zero_pp_rank_1" in f for f in files)
    assert {"engine_state_r00000.pt", "engine_state_r00001.pt"} <= set(files)


def test_export_of_a_bf16_run_without_zero_uses_the_fp32_masters(env, tmp_path):
    """Regression: ZeRO-0 bf16 keeps bf16 weights in the module and the fp32 masters in the
    optimiser (by group position); export must write the masters, not the rounded weights."""
    from safetensors.torch import load_file

    out = str(tmp_path / "bf16")
    _run([sys.executable, "-m", "engine", "pretrain", "-c", TINY, f"train.output_dir={out}",
          "deepspeed.precision=bf16", "deepspeed.zero_stage=0", "schedule.max_steps=2"], env)
    _run([sys.executable, "-m", "engine", "export", out, "--out", f"{out}/b.safetensors"], env)
    sd = load_file(f"{out}/b.safetensors")
    w = sd["blocks.0.mlp.fc1.weight"]
    assert w.dtype == torch.float32
    assert not torch.equal(w.bfloat16().float(), w)  # real fp32 values, not bf16 ones widened
    # every master at its own key: each rounds to the module's bf16 copy of that tensor (masters written
    # to the wrong keys of the same shape passed the check above)
    module = torch.load(f"{out}/checkpoints/step00000002/mp_rank_00_model_states.pt", map_location="cpu",
                        weights_only=False)["module"]
    floats = [k for k in sd if module[k].dtype == torch.bfloat16]
    assert len(floats) > 20 and all(torch.equal(sd[k].bfloat16(), module[k]) for k in floats)
    umask = os.umask(0)
    os.umask(umask)
    assert os.stat(f"{out}/b.safetensors").st_mode & 0o777 == 0o666 & ~umask  # not safetensors' 0600
    assert not [f for f in os.listdir(out) if ".tmp" in f]
    # the paths --resume and eval --checkpoint take ("checkpoints/latest: not found" before); the default
    # output goes to the run folder, not into checkpoints/
    for i, src in enumerate((f"{out}/checkpoints/latest", f"{out}/checkpoints/step00000002", f"{out}/checkpoints")):
        p = _run([sys.executable, "-m", "engine", "export", src], env)
        assert f"from step00000002 to {out}/backbone.safetensors" in p.stdout, (src, p.stdout[-500:])
        assert ("(replaced the earlier file)" in p.stdout) == (i > 0)  # (said, not silent)
        assert torch.equal(load_file(f"{out}/backbone.safetensors")["blocks.0.mlp.fc1.weight"], w)
    os.remove(f"{out}/backbone.safetensors")


def test_export_of_a_bf16_zero1_run_uses_the_fp32_masters(env, tmp_path):
    """Regression: bf16 ZeRO-1/2 shards are named bf16_zero_pp_rank_*; export took them for a ZeRO-0
    checkpoint and wrote the module's bf16-rounded weights instead of DeepSpeed's fp32 masters."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from safetensors.torch import load_file

    out = str(tmp_path / "bf16z1")
    _run([sys.executable, "-m", "engine", "pretrain", "-c", TINY, f"train.output_dir={out}",
          "deepspeed.precision=bf16", "deepspeed.zero_stage=1", "schedule.max_steps=2"], env)
    assert any(f.startswith("bf16_zero_pp_rank_") for f in os.listdir(f"{out}/checkpoints/step00000002"))
    _run([sys.executable, "-m", "engine", "export", out, "--out", f"{out}/b.safetensors"], env)
    sd = load_file(f"{out}/b.safetensors")
    want = get_fp32_state_dict_from_zero_checkpoint(f"{out}/checkpoints", tag="step00000002")
    assert sd.keys() <= want.keys() and all(torch.equal(sd[k], want[k].float()) for k in sd)
    assert not torch.equal(sd["blocks.0.mlp.fc1.weight"].bfloat16().float(), sd["blocks.0.mlp.fc1.weight"])
    # the tag's model-states file as finetune.pretrained: its bf16 copy was used silently
    from engine.checkpoint import load_pretrained

    with pytest.raises(ValueError, match=r"bfloat16 copy.*maskfeat export .*step00000002"):
        load_pretrained(f"{out}/checkpoints/step00000002/mp_rank_00_model_states.pt")


def test_deepspeed_launcher_runs_the_module(env, tmp_path):
    """``deepspeed --module engine ...`` (it inserts ``--local_rank=N`` before our arguments)."""
    out = str(tmp_path / "dsl")
    launcher = os.path.join(os.path.dirname(sys.executable), "deepspeed")
    e = dict(env, PATH=os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", ""))
    p = _run([launcher, "--num_nodes", "1", "--num_gpus", "2", "--master_port", str(_free_port()), "--module",
              "engine", "pretrain", "-c", TINY, f"train.output_dir={out}", "deepspeed.zero_stage=2",
              "schedule.max_steps=2"], e)
    assert "world size          2" in p.stdout
    files = os.listdir(os.path.join(out, "checkpoints", "step00000002"))
    assert any("zero_pp_rank_1" in f for f in files), files


def test_nonfinite_losses_are_skipped_then_stop(env, tmp_path):
    out = str(tmp_path / "nan")
    e = dict(env, NAN_STEPS="2,4,5,6")
    _run([sys.executable, DRIVER, "nonfinite", out, "schedule.max_steps=8", "train.max_nonfinite=3"], e)
    with open(os.path.join(out, "result.json")) as f:
        res = json.load(f)
    assert res["ok"] is False
    assert "3 steps in a row without an update (non-finite losses or gradients) at step 6" in res["error"]
    # advice that fits the run, and no "checkpoint is None" (it said "or use bf16/fp32" in fp32)
    assert ("Lower optim.lr, or clip gradients harder (a smaller deepspeed.gradient_clipping, now 0.02); no "
            f"checkpoint of {out} yet") in res["error"], res["error"]
    recs = [json.loads(l) for l in open(os.path.join(out, "metrics.jsonl"))]
    # steps 1-5 logged (the 6th raised): 2 skipped, 3 fine (streak reset), 4 and 5 skipped
    assert [r["step"] for r in recs] == [1, 2, 3, 4, 5]
    assert [r["nonfinite_total"] for r in recs] == [0, 1, 1, 2, 3]
    assert [r["loss"] == "nan" for r in recs] == [False, True, False, True, True]
    assert [r["grad_norm"] == "nan" for r in recs] == [False, True, False, True, True]  # (was the step before's)


@pytest.mark.parametrize("stage", [0, 2])
def test_nonfinite_gradients_of_a_finite_loss_are_skipped_then_stop(env, tmp_path, stage):
    """A finite loss whose gradient is NaN: stage-0 fp32 applied it (every weight NaN from then on,
    and a checkpoint of NaN weights named as the last good one); ZeRO skipped the update silently
    (counted as trained, nonfinite_total 0). Now both skip it, count it and stop after
    train.max_nonfinite in a row."""
    out = str(tmp_path / f"nangrad{stage}")
    e = dict(env, NAN_GRAD_STEPS="2")
    _run([sys.executable, DRIVER, "nonfinite", out, "schedule.max_steps=4", f"deepspeed.zero_stage={stage}"], e)
    res = json.load(open(os.path.join(out, "result.json")))
    assert res["ok"] and res["nonfinite_total"] == 1 and res["weights_finite"], res
    recs = [json.loads(l) for l in open(os.path.join(out, "metrics.jsonl"))]
    assert [r["nonfinite_total"] for r in recs] == [0, 1, 1, 1]
    assert [r["grad_norm"] == "nan" for r in recs] == [False, True, False, False]
    assert all(r["loss"] != "nan" for r in recs)  # the loss itself was finite
    out = str(tmp_path / f"nangrad{stage}_stop")
    e = dict(env, NAN_GRAD_STEPS="2,3,4")
    _run([sys.executable, DRIVER, "nonfinite", out, "schedule.max_steps=6", "train.max_nonfinite=3",
          f"deepspeed.zero_stage={stage}"], e)
    res = json.load(open(os.path.join(out, "result.json")))
    assert not res["ok"] and "3 steps in a row without an update" in res["error"] and res["weights_finite"], res


def test_a_failing_epoch_evaluation_loses_no_training(env, tmp_path):
    """The epoch's checkpoint is written before its evaluation (SlowFast's order): an evaluation that
    raises loses no training, and ``--resume auto`` runs the missed evaluation before training on."""
    out = str(tmp_path / "ft")
    args = [sys.executable, DRIVER, "evalfail", out, "data.clips_per_epoch=4", "schedule.max_steps=0",
            "train.checkpoint_every_epochs=1", "train.eval_every_epochs=1"]
    _run(args, dict(env, FAIL_EVALS="1"))
    res = json.loads(open(os.path.join(out, "result.json")).read())
    assert res == {"error": "evaluation 1 failed (FAIL_EVALS)", "evaluations": 1}
    assert open(os.path.join(out, "checkpoints", "latest")).read().strip() == "step00000002"  # epoch 1's
    p = _run(args + ["--resume", "auto"], env)
    res = json.loads(open(os.path.join(out, "result.json")).read())
    assert res == {"error": None, "evaluations": 2}
    assert "resumed from" in p.stdout and "evaluating first" in p.stdout
    recs = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    assert [r["step"] for r in recs if r["split"] == "val"] == [2, 4]  # the missed one, then the final
    assert [r["step"] for r in recs if r["split"] == "train"] == [1, 2, 3, 4]


def test_a_failed_best_save_is_evaluated_again_on_resume(env, tmp_path):
    """The evaluation's record was written before its `best` save: a save that failed (a full disk)
    or was killed left a recorded score no `best` held, the resume took that evaluation as done, and
    a later, worse epoch became `best`. The record now follows the save."""
    from engine.finetune import saved_best_metric

    out = str(tmp_path / "ft")
    args = [sys.executable, DRIVER, "evalfail", out, "data.clips_per_epoch=4", "schedule.max_steps=0",
            "schedule.epochs=3", "train.checkpoint_every_epochs=1", "train.eval_every_epochs=1"]
    _run(args, dict(env, TOP1_EVALS="50,80", FAIL_BEST_SAVES="2"))
    res = json.loads(open(os.path.join(out, "result.json")).read())
    assert res == {"error": "best save 2 failed (FAIL_BEST_SAVES)", "evaluations": 2}
    p = _run(args + ["--resume", "auto"], dict(env, TOP1_EVALS="80,60"))
    assert "evaluating first" in p.stdout
    assert json.loads(open(os.path.join(out, "result.json")).read()) == {"error": None, "evaluations": 2}
    recs = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl")) if '"val"' in line]
    assert [(r["step"], r["top1"]) for r in recs] == [(2, 50.0), (4, 80.0), (6, 60.0)]
    assert saved_best_metric(out) == 80.0


def test_a_resume_mapped_back_to_an_epoch_start_does_not_evaluate_again(env, tmp_path):
    """A checkpoint inside epoch 2 (step 5, 4 steps per epoch) resumed with a larger global batch maps
    back to batch 0 of that epoch: the "evaluation due at the end of epoch 1" was run again, on weights
    trained past that point, and recorded as a second evaluation of epoch 1."""
    out = str(tmp_path / "ft")
    args = [sys.executable, DRIVER, "evalfail", out, "schedule.max_steps=0", "train.checkpoint_every_steps=5",
            "train.eval_every_epochs=1"]
    _run(args + ["train.stop_after_steps=5"], env)
    res = json.loads(open(os.path.join(out, "result.json")).read())
    assert res["evaluations"] == 1 and res["error"].startswith("stopped after step 5"), res
    p = _run(args + ["data.batch_size=4", "--resume", "auto"], env)
    assert "continuing at batch 0" in p.stdout + p.stderr and "evaluating first" not in p.stdout
    assert json.loads(open(os.path.join(out, "result.json")).read()) == {"error": None, "evaluations": 1}
    recs = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl")) if '"val"' in line]
    assert [r["epoch"] for r in recs] == [1.0, 2.0]


def test_a_resume_that_evaluates_another_split_replaces_best(env, tmp_path):
    """`best` holds a top-1 of the split it was selected on: a resume with another finetune.eval_split
    compared the new split's scores against it (a val score against train ones)."""
    from engine.finetune import saved_best_metric

    out = str(tmp_path / "ft")
    args = [sys.executable, DRIVER, "evalfail", out, "data.clips_per_epoch=4", "schedule.max_steps=0",
            "schedule.epochs=3", "train.checkpoint_every_epochs=1", "train.eval_every_epochs=1"]
    _run(args + ["train.stop_after_steps=3"], dict(env, TOP1_EVALS="80"))
    assert saved_best_metric(out) == 80.0
    p = _run(args + ["finetune.eval_split=train", "--resume", "auto"], dict(env, TOP1_EVALS="60,50"))
    assert "`best` was selected on split 'val', this run evaluates 'train'" in p.stdout, p.stdout[-2000:]
    assert saved_best_metric(out) == 60.0


def test_a_finetune_resume_of_a_tag_a_stopped_resave_left_aside(env, tmp_path):
    """A re-save stopped between its renames leaves the step tag as ``<tag>.old``, which the set-up puts
    back: fine-tuning looked for the checkpoint before that, found none, and took the run for a fresh
    one (a missing finetune.pretrained refused the resume; an empty one printed "random weights")."""
    out = str(tmp_path / "ft")
    args = [sys.executable, DRIVER, "evalfail", out, "data.clips_per_epoch=4", "schedule.max_steps=0",
            "schedule.epochs=2", "train.checkpoint_every_epochs=1", "train.eval_every_epochs=0"]
    _run(args + ["train.stop_after_steps=3"], env)
    ck = os.path.join(out, "checkpoints")
    os.replace(os.path.join(ck, "step00000002"), os.path.join(ck, "step00000002.old"))
    p = _run(args + [f"finetune.pretrained={tmp_path / 'gone.safetensors'}", "--resume", "auto"], env)
    assert "restored step00000002 from step00000002.old" in p.stdout, p.stdout[-2000:] + p.stderr[-2000:]
    assert "resuming the latest checkpoint: finetune.pretrained=" in p.stdout and "random weights" not in p.stdout
    assert json.loads(open(os.path.join(out, "result.json")).read())["error"] is None


def test_an_evaluation_with_non_finite_views_is_not_kept_as_best(env, tmp_path):
    """A diverged model's evaluation (non-finite logits) is no candidate for ``best``, whatever its
    top-1 (which maskfeat eval RUN then evaluates by default)."""
    from engine.finetune import saved_best_metric

    out = str(tmp_path / "ft")
    _run([sys.executable, DRIVER, "evalfail", out, "data.clips_per_epoch=4", "schedule.max_steps=0",
          "train.checkpoint_every_epochs=1", "train.eval_every_epochs=1"], dict(env, NAN_EVALS="2"))
    recs = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl")) if '"val"' in line]
    assert [r["top1"] for r in recs][1] == 100.0 and recs[1]["nonfinite_views"] == 1
    assert saved_best_metric(out) == recs[0]["top1"] < 100.0  # the first, finite evaluation stays best


def test_fixed_batch_is_overfit(env):
    """The pre-training objective can be driven down: 30 AdamW steps on one real batch, one mask."""
    from engine.data import DataConfig, build_loader
    from engine.optim import build_optimizer, param_groups
    from models.masking import make_masks
    from models.variants import create_model

    torch.manual_seed(0)
    cfg = DataConfig(num_frames=8, crop_size=64, batch_size=2, clips_per_epoch=2, num_threads=1,
                     cache_dir=env["MASKFEAT_CACHE"])
    batch = next(iter(build_loader(cfg, "train")))
    model = create_model("mvitv2_tiny", task="pretrain", num_frames=8, img_size=64)
    opt = build_optimizer(param_groups(model, 0.0), lr=2e-3)
    mask = make_masks("cube", 2, model.mask_grid(8, 64, 64), 0.4, np.random.default_rng(0))
    losses = []
    for _ in range(30):
        loss = model(batch["video"], mask).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[0] / losses[-1] > 4, losses


def test_cli_config_errors_exit_2(env):
    p = _run([sys.executable, "-m", "engine", "pretrain", "-c", TINY, "optim.weight_decy=0.1"], env, ok=(2,))
    assert "did you mean 'optim.weight_decay'" in p.stderr
    p = _run([sys.executable, "-m", "engine", "finetune", "-c", TINY, "deepspeed.zero_stage=5"], env, ok=(2,))
    assert "not one of 0, 1, 2, 3" in p.stderr
    p = _run([sys.executable, "-m", "engine", "pretrain", "--help-config"], env)
    assert "deepspeed.gradient_clipping = 0.02" in p.stdout


def test_cli_data_errors_exit_5_without_traceback(env, tmp_path):
    """A missing dataset or a bad file is a user error: one clear line, exit code 5."""
    p = _run([sys.executable, "-m", "engine", "pretrain", "-c", TINY, "data.dataset=kinetics",
              f"data.root={tmp_path / 'missing'}"], env, ok=(5,))
    assert "data error" in p.stderr and "train.csv" in p.stderr and "Traceback" not in p.stderr
    (tmp_path / "vids" / "cls").mkdir(parents=True)
    (tmp_path / "vids" / "cls" / "broken.mp4").write_bytes(b"not a video")
    p = _run([sys.executable, "-m", "engine", "pretrain", "-c", TINY, "data.dataset=folder",
              f"data.root={tmp_path / 'vids'}"], env, ok=(5,))
    assert "broken.mp4" in p.stderr and "not_video" in p.stderr and "Traceback" not in p.stderr


@pytest.mark.gpu
def test_gpu_pretrain_bf16_zero2_then_resume(env, tmp_path):
    """The engine on one GPU as users run it: NCCL, bf16, ZeRO-2, the fused HOG kernel and the auto
    data path (DALI's NVDEC where every clip suits it, else PyAV through DALI's external source);
    a checkpoint, then --resume auto."""
    pytest.importorskip("nvidia.dali", reason="DALI is not installed here (bench/gpu_wheels carries it)")
    common = [sys.executable, "-m", "engine", "pretrain", "-c", TINY, "train.device=cuda",
              "deepspeed.precision=bf16", "deepspeed.zero_stage=2", "train.checkpoint_every_steps=3",
              f"train.output_dir={tmp_path / 'gpu'}"]
    p = _run(common + ["schedule.max_steps=6"], env)
    assert "(nccl), data reader" in p.stdout
    losses = _losses(str(tmp_path / "gpu"))
    assert [s for s, _ in losses] == [1, 2, 3, 4, 5, 6]
    assert all(np.isfinite(l) for _, l in losses)
    p = _run(common + ["schedule.max_steps=8", "--resume", "auto"], env)
    assert "resumed from" in p.stdout and "step00000006 at step 6" in p.stdout
    assert [s for s, _ in _losses(str(tmp_path / "gpu"))][-2:] == [7, 8]


@pytest.mark.gpu
def test_gpu_training_step_waits_for_the_gpu_once(env, tmp_path):
    """From one step's start to the next (bf16, ZeRO-2, one GPU), our code makes the CPU wait for
    the GPU once: the all-reduced non-finite flag after the forward. Labels, masks, the loss and
    the grad norm travel without a wait (engine.data.transfer, runner._ReadBack), so the CPU can
    queue the next step while the GPU finishes this one. Waits inside DeepSpeed or the loader are
    listed in the report (syncs.json) but not held against us."""
    pytest.importorskip("nvidia.dali", reason="DALI is not installed here (bench/gpu_wheels carries it)")
    _run([sys.executable, DRIVER, "syncs", str(tmp_path)], env)
    report = json.loads((tmp_path / "syncs.json").read_text())
    watched = report["watched_steps"]
    ours = [s for s in report["syncs"] if s["ours"]]
    print(json.dumps(report["syncs"], indent=1))
    per_step = {k: [s["where"] for s in ours if s["step"] == k] for k in watched}
    assert all(len(w) == 1 and "engine/runner.py" in w[0] for w in per_step.values()), per_step


def test_cli_out_of_memory_exits_6_with_what_to_change(monkeypatch, capsys, tmp_path):
    """A run out of GPU memory ends with one paragraph: torch's message, the config changes that fit
    it (activation checkpointing while it is off, a smaller batch), and no traceback."""
    import torch

    import engine.pretrain
    from engine import cli

    def oom(cfg, resume=None):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 79.1 GiB total)")

    monkeypatch.setattr(engine.pretrain, "run_pretrain", oom)
    out = f"train.output_dir={tmp_path}"
    assert cli.main(["pretrain", "-c", TINY, out]) == 6
    err = capsys.readouterr().err
    assert "Tried to allocate 2.00 GiB" in err and "model.activation_checkpointing=N for the first N blocks (now 0)" in err
    assert "data.batch_size (now" in err and "Traceback" not in err
    # the counting command is of this run's model and batch (it counted MViTv2-L at batch 4, and
    # +ckpt8 failed on a model of 4 blocks)
    assert "bench.model_step --count-only --model mvitv2_tiny --batch 2 --backends auto,auto+ckpt`" in err, err
    assert cli.main(["pretrain", "-c", TINY, out, "model.activation_checkpointing=1"]) == 6
    assert "recompute more blocks" in capsys.readouterr().err
    assert cli.main(["pretrain", "-c", TINY, out, "model.activation_checkpointing=true"]) == 6
    assert "activation_checkpointing" not in capsys.readouterr().err  # already on: only the batch is left

    # evaluation batches hold data.eval_batch_size views when it is set: that is what to lower
    from engine.config import load_config

    cfg = load_config(TINY, ["data.eval_batch_size=8"])
    oom = torch.OutOfMemoryError("CUDA out of memory.")
    assert "To fit, lower data.eval_batch_size (now 8)." in cli.out_of_memory_hint(cfg, "eval", oom)
    assert "if it ran out in an evaluation, lower data.eval_batch_size (now 8)" in cli.out_of_memory_hint(
        cfg, "finetune", oom)
    assert "To fit, lower data.batch_size (now 2)." in cli.out_of_memory_hint(load_config(TINY), "eval", oom)

    monkeypatch.setattr(engine.pretrain, "run_pretrain", lambda cfg, resume=None: 1 / 0)
    with pytest.raises(ZeroDivisionError):  # anything else still raises
        cli.main(["pretrain", "-c", TINY, out])


def test_cli_checkpointing_more_blocks_than_the_model_has_exits_2(env, tmp_path):
    p = _run([sys.executable, "-m", "engine", "pretrain", "-c", TINY, "model.activation_checkpointing=99",
              f"train.output_dir={tmp_path}"], env, ok=(2,))
    assert "model.activation_checkpointing=99" in p.stderr and "the model has" in p.stderr


def test_export_of_a_damaged_or_missing_checkpoint_is_one_line(env, tmp_path):
    """A checkpoint with a ZeRO shard missing is not complete (--resume auto skips it), and export of it,
    of a truncated one, of a missing tag or path is one line with exit 2 (tracebacks before); an --out
    folder gets backbone.safetensors inside."""
    import glob as _glob

    from engine.checkpoint import available_tags, is_complete, latest_tag

    out = str(tmp_path / "z1")
    _run([sys.executable, "-m", "engine", "pretrain", "-c", TINY, f"train.output_dir={out}",
          "deepspeed.zero_stage=1", "schedule.max_steps=2", "train.checkpoint_every_steps=1"], env)
    ck = os.path.join(out, "checkpoints")
    good, bad = os.path.join(ck, "step00000001"), os.path.join(ck, "step00000002")
    os.remove(_glob.glob(os.path.join(bad, "*zero_pp_rank_0_*optim_states.pt"))[0])
    assert is_complete(good) and not is_complete(bad)
    assert latest_tag(ck) == "step00000001" and available_tags(ck) == ["step00000001"]  # what --resume auto takes
    p = _run([sys.executable, "-m", "engine", "export", out, "--tag", "step00000002"], env, ok=(2,))
    assert "lacks ZeRO optimiser shards: incomplete or damaged; complete tags: step00000001" in p.stderr
    model = os.path.join(good, "mp_rank_00_model_states.pt")
    with open(model, "r+b") as f:
        f.truncate(os.path.getsize(model) // 2)
    p = _run([sys.executable, "-m", "engine", "export", out, "--tag", "step00000001"], env, ok=(2,))
    assert "cannot be read" in p.stderr and "incomplete or damaged" in p.stderr and "Traceback" not in p.stderr
    p = _run([sys.executable, "-m", "engine", "export", out, "--tag", "step9"], env, ok=(2,))
    assert "no checkpoint 'step9'" in p.stderr and "available: step00000001, step00000002" in p.stderr
    p = _run([sys.executable, "-m", "engine", "export", str(tmp_path / "nowhere")], env, ok=(2,))
    assert "not found" in p.stderr and "Traceback" not in p.stderr
    os.makedirs(tmp_path / "exports")
    _run([sys.executable, "-m", "engine", "pretrain", "-c", TINY, f"train.output_dir={tmp_path / 'ok'}",
          "schedule.max_steps=1"], env)
    _run([sys.executable, "-m", "engine", "export", str(tmp_path / "ok"), "--out", str(tmp_path / "exports")], env)
    assert os.path.isfile(tmp_path / "exports" / "backbone.safetensors")


_FULL_DISK = r"""
import sys
import torch
import engine.runner as R
orig = R.save_checkpoint

def save(engine, output_dir, tag, **kw):
    if tag == "step00000003":  # a full disk as torch.save meets it: a RuntimeError, not an OSError
        torch.save({"x": torch.zeros(4096)}, "/dev/full")
    return orig(engine, output_dir, tag, **kw)

R.save_checkpoint = save
from engine.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_a_checkpoint_that_cannot_be_written_exits_7_naming_the_last_complete_one(env, tmp_path):
    out = str(tmp_path / "run")
    p = _run([sys.executable, "-c", _FULL_DISK, "pretrain", "-c", TINY, f"train.output_dir={out}",
              "train.checkpoint_every_steps=1", "schedule.max_steps=4"], env, ok=(7,))
    assert "saving checkpoint step00000003" in p.stderr and "inline_container" in p.stderr
    assert "the last complete checkpoint is" in p.stderr and "step00000002" in p.stderr and "Traceback" not in p.stderr
    p = _run([sys.executable, "-m", "engine", "pretrain", "-c", TINY, f"train.output_dir={out}",
              "train.checkpoint_every_steps=1", "schedule.max_steps=4", "--resume", "auto"], env)
    assert "resumed from" in p.stdout and "step00000002" in p.stdout


_ONE_RANK_FULL = r"""
import errno, os, sys
import torch
real = torch.save

def save(obj, f, *a, **k):
    if isinstance(f, str) and os.environ["FAIL_FILE"] in f and ".tmp-step00000002" in f:
        raise OSError(errno.ENOSPC, "No space left on device")
    return real(obj, f, *a, **k)

torch.save = save
import engine.checkpoint as C
real_text = C.write_text_atomic

def text(path, content):  # the pointer named right before the tag's rename (rank 0 writes it)
    if os.environ["FAIL_FILE"] in path and content == "step00000002":
        raise OSError(errno.ENOSPC, "No space left on device")
    return real_text(path, content)

C.write_text_atomic = text
from engine.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize("file,rank", [("engine_state_r00001", 1), ("mp_rank_00_model_states", 0), ("latest.next", 0)])
def test_a_save_failing_on_one_rank_stops_every_rank(env, tmp_path, file, rank):
    """A node-local disk full on one rank: every rank learns it before the checkpoint's barrier and
    exits 7 (the others waited in the barrier until the timeout). Also when DeepSpeed's own write
    fails (rank 0's model states): the other rank died in a collective with a gloo traceback."""
    wrapper = tmp_path / "w.py"
    wrapper.write_text(_ONE_RANK_FULL)
    out = str(tmp_path / "run")
    p = _run([TORCHRUN, "--nproc_per_node", "2", "--master_port", str(_free_port()), str(wrapper), "pretrain", "-c",
              TINY, f"train.output_dir={out}", "train.checkpoint_every_steps=1", "schedule.max_steps=3"],
             dict(env, FAIL_FILE=file), timeout=240, ok=(1,))  # torchrun: 1 when its children fail
    assert p.stderr.count("saving checkpoint step00000002") == 2, p.stderr[-3000:]
    assert f"failed on rank {rank} (OSError: [Errno 28] No space left on device" in p.stderr
    assert p.stderr.count(f"maskfeat pretrain: saving checkpoint step00000002 in {out} failed on rank") == 2, \
        (p.stderr.count(f"maskfeat pretrain: saving checkpoint step00000002 in {out} failed on rank"), p.stderr[-3000:])  # each rank's own clean message, none dies in a collective
    assert "Connection closed" not in p.stderr, p.stderr[-3000:]
    other = ("another node failed to update the checkpoint folder" if file == "latest.next" else  # (the
             "another rank could not write its part of checkpoint step00000002")  # others waited in a barrier)
    assert other in p.stderr, p.stderr[-3000:]
    assert open(os.path.join(out, "checkpoints", "latest")).read().strip() == "step00000001"


def test_fp16_overflow_skips_count_only_at_the_minimum_or_a_static_scale():
    """fp16 at stage 0 (FP16_UnfusedOptimizer) clamps its loss scale at the minimum and never raises:
    a run whose gradients stay non-finite skipped every update for ever, uncounted. The scaler's
    search above its minimum stays routine (not counted); ZeRO's scaler has the same rule."""
    from types import SimpleNamespace as NS

    from engine.runner import _scale_search

    unfused = NS(loss_scale_config=NS(dynamic_loss_scale=True, cur_scale=2.0 ** 12, min_loss_scale=1.0))
    assert _scale_search(unfused)
    unfused.loss_scale_config.cur_scale = 1.0
    assert not _scale_search(unfused)
    assert not _scale_search(NS(loss_scale_config=NS(dynamic_loss_scale=False, cur_scale=128.0, min_loss_scale=1.0)))
    zero = NS(loss_scaler=NS(dynamic=True, cur_scale=2.0 ** 10, min_scale=1.0))
    assert _scale_search(zero)
    zero.loss_scaler.cur_scale = 1.0
    assert not _scale_search(zero)
    assert not _scale_search(NS(loss_scaler=NS(dynamic=False, cur_scale=1024.0)))


_UNFUSED_NORM = """
import os, torch
os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ["PORT"])
from types import SimpleNamespace
from engine.distributed import init_distributed
from engine.runner import _norm_scale, _step_grad_norm
init_distributed("cpu")
from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer
torch.manual_seed(0)
m = torch.nn.Linear(8, 4).half()
adamw = torch.optim.AdamW(m.parameters(), lr=1e-3)
assert _norm_scale(adamw) == 1.0
o = FP16_UnfusedOptimizer(adamw, dynamic_loss_scale=True, clip_grad=1.0,
                          dynamic_loss_args={"init_scale": 2 ** 16, "scale_window": 1000, "min_scale": 1, "delayed_shift": 2})
o.backward(m(torch.randn(16, 8).half()).float().pow(2).mean())
scale = _norm_scale(o)
true = float(torch.linalg.vector_norm(torch.stack([p.grad.float().norm() for p in m.parameters()]))) / scale
o.step()
print(scale, true, _step_grad_norm(SimpleNamespace(get_global_grad_norm=lambda: o._global_grad_norm), scale, None))
"""


def test_the_unfused_fp16_grad_norm_is_unscaled(env):
    """Stage-0 fp16 (DeepSpeed's FP16_UnfusedOptimizer) records the norm of the loss-scaled gradients:
    the logged grad_norm (and the skip message) read 65536x the true norm at the initial scale. The
    engine divides by the scale it read before the step; DeepSpeed's real optimizer, on the CPU."""
    import random
    import subprocess

    p = subprocess.run([sys.executable, "-c", _UNFUSED_NORM], env=dict(env, PORT=str(random.randint(20000, 40000))),
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    scale, true, logged = (float(x) for x in p.stdout.split()[-3:])
    assert scale == 2.0 ** 16 and logged == pytest.approx(true, rel=1e-3) and 0 < true < 10
