"""Subprocess driver for the distributed engine tests (run under ``torchrun`` or alone).

``python tests/engine/driver.py MODE OUT_DIR [overrides...]``

- ``zero``: pre-train a few steps, export the consolidated backbone on rank 0 (all ZeRO stages
  through ``engine.checkpoint.export_backbone``), fine-tune from it a few steps with evaluation;
  writes ``OUT_DIR/result_r<rank>.json`` with the pre-training losses and the eval result.
- ``nonfinite``: pre-training whose loss is replaced by NaN on the steps listed in
  ``NAN_STEPS`` (comma-separated), and whose gradient is made NaN with a finite loss on those in
  ``NAN_GRAD_STEPS``, to exercise the skip/stop logic; writes the outcome and whether the final
  weights are finite.
- ``evalfail``: fine-tuning whose evaluations listed in ``FAIL_EVALS`` (1-based, comma-separated)
  raise, those in ``NAN_EVALS`` report a non-finite view with a top-1 of 100, the k-th reports the
  k-th top-1 of ``TOP1_EVALS`` when given, and the saves of ``best`` listed in ``FAIL_BEST_SAVES``
  raise a write failure (a full disk); ``--resume auto`` as the last override resumes. Writes
  ``OUT_DIR/result.json``: the error, if any, and the step of every evaluation that ran.
- ``signal_in_save``: fine-tuning through the CLI, a SIGTERM sent during save number
  ``SIGNAL_SAVE``; exits with the CLI's status.
- ``syncs`` (CUDA): bf16 ZeRO-2 pre-training with torch's sync debug mode on from the third step
  to the last; writes every call that made the CPU wait for the GPU, with the innermost frame of
  ours (engine/, models/, kernels/) or else the innermost frame, and the step it came in.
"""
from __future__ import annotations

import json
import os
import sys

if sys.argv[1:2] != ["syncs"]:  # (that mode runs the real kernels on a GPU)
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

from engine.config import load_config  # noqa: E402


def _losses(path: str) -> dict[int, float]:
    out = {}
    with open(path) as f:
        for line in f:
            rec = json.loads(line)
            if rec.get("split") == "train" and isinstance(rec.get("loss"), float):
                out[rec["step"]] = rec["loss"]
    return out


def zero(out_dir: str, overrides: list[str]) -> None:
    from engine.checkpoint import export_backbone
    from engine.distributed import barrier
    from engine.finetune import run_eval, run_finetune
    from engine.pretrain import run_pretrain

    pre = load_config("tests/engine/tiny.yaml", [f"train.output_dir={out_dir}/pre"] + overrides)
    run_pretrain(pre)
    rank = torch.distributed.get_rank()
    export = os.path.join(out_dir, "backbone.safetensors")
    if rank == 0:
        export_backbone(os.path.join(out_dir, "pre"), export)
    barrier()
    ft = load_config("tests/engine/tiny.yaml", [f"train.output_dir={out_dir}/ft", f"finetune.pretrained={export}",
                                                 "data.num_clips=2", "optim.layer_decay=0.75",
                                                 "deepspeed.gradient_clipping=5.0"] + overrides)
    summary = run_finetune(ft)
    # the run's evaluation on 2 ranks once more, with its predictions kept aside: the test evaluates the
    # same weights in one process and compares the probabilities (a view lost or counted twice in the
    # gather kept the view count)
    run_eval(ft, os.path.join(out_dir, "ft"), save_predictions=True)
    if rank == 0:
        os.replace(os.path.join(out_dir, "ft", "eval.predictions.npz"), os.path.join(out_dir, "predictions_2ranks.npz"))
    barrier()
    res = {"pre_losses": _losses(os.path.join(out_dir, "pre", "metrics.jsonl")) if rank == 0 else None,
           "eval": summary["eval"], "world": torch.distributed.get_world_size()}
    with open(os.path.join(out_dir, f"result_r{rank}.json"), "w") as f:
        json.dump(res, f)


def nonfinite(out_dir: str, overrides: list[str]) -> None:
    from engine import pretrain as P
    from engine.runner import NonFiniteLossError

    nan_steps = {int(s) for s in os.environ.get("NAN_STEPS", "").split(",") if s}
    grad_steps = {int(s) for s in os.environ.get("NAN_GRAD_STEPS", "").split(",") if s}
    cfg = load_config("tests/engine/tiny.yaml", [f"train.output_dir={out_dir}"] + overrides)
    orig = P.pretrain_step
    calls = {"n": 0}

    def poisoned(run, batch):
        calls["run"] = run
        loss = orig(run, batch)
        calls["n"] += 1
        if calls["n"] in grad_steps:  # the value stays finite (0·√0), its gradient is 0·∞ = NaN
            p = next(run.engine.module.parameters())
            return loss + 0 * torch.sqrt((p - p.detach()).sum())
        return loss * float("nan") if calls["n"] in nan_steps else loss

    P.pretrain_step = poisoned
    try:
        summary = P.run_pretrain(cfg)
        res = {"ok": True, "nonfinite_total": summary["nonfinite_total"], "steps": summary["steps"]}
    except NonFiniteLossError as e:
        res = {"ok": False, "error": str(e)}
    res["weights_finite"] = all(bool(torch.isfinite(p).all()) for p in calls["run"].engine.module.parameters())
    if torch.distributed.get_rank() == 0:
        with open(os.path.join(out_dir, "result.json"), "w") as f:
            json.dump(res, f)


def evalfail(out_dir: str, overrides: list[str]) -> None:
    from engine import finetune as F

    from engine import runner as R

    fail = {int(s) for s in os.environ.get("FAIL_EVALS", "").split(",") if s}
    nan = {int(s) for s in os.environ.get("NAN_EVALS", "").split(",") if s}  # these report non-finite views
    top1 = [float(s) for s in os.environ.get("TOP1_EVALS", "").split(",") if s]
    fail_best = {int(s) for s in os.environ.get("FAIL_BEST_SAVES", "").split(",") if s}
    resume = None
    if overrides[-2:] == ["--resume", "auto"]:
        overrides, resume = overrides[:-2], "auto"
    cfg = load_config("tests/engine/tiny.yaml", [f"train.output_dir={out_dir}"] + overrides)
    orig, seen = F.evaluate, []

    def failing(*args, **kwargs):
        seen.append(len(seen) + 1)
        if seen[-1] in fail:
            raise RuntimeError(f"evaluation {seen[-1]} failed (FAIL_EVALS)")
        res = orig(*args, **kwargs)
        if seen[-1] in nan:  # a diverged model whose arbitrary top-k scored well
            res.update(top1=100.0, nonfinite_views=1, nonfinite_videos=1)
        if seen[-1] <= len(top1):
            res.update(top1=top1[seen[-1] - 1])
        return res

    save, best_saves = R.Run.save, []

    def failing_save(self, tag=None, **kwargs):
        if tag == "best":
            best_saves.append(self.state.step)
            if len(best_saves) in fail_best:
                raise R.SaveError(f"best save {len(best_saves)} failed (FAIL_BEST_SAVES)")
        return save(self, tag, **kwargs)

    F.evaluate, R.Run.save = failing, failing_save
    try:
        F.run_finetune(cfg, resume=resume)
        res = {"error": None}
    except (RuntimeError, R.StopRequested) as e:  # (train.stop_after_steps: a simulated kill)
        res = {"error": str(e)}
    res["evaluations"] = len(seen)
    with open(os.path.join(out_dir, "result.json"), "w") as f:
        json.dump(res, f)


def syncs(out_dir: str, overrides: list[str]) -> None:
    import traceback
    import warnings

    from engine import pretrain as P

    steps = 8
    cfg = load_config("tests/engine/tiny.yaml", [f"train.output_dir={out_dir}", "train.device=cuda",
                                                 "deepspeed.precision=bf16", "deepspeed.zero_stage=2",
                                                 f"schedule.max_steps={steps}", "log.every_steps=1000",
                                                 # one epoch holds every step: no loader restart inside the window
                                                 f"data.clips_per_epoch={2 * steps}"] + overrides)
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    ours = tuple(os.path.join(repo, d) + os.sep for d in ("engine", "models", "kernels"))
    torch_dir = os.path.dirname(torch.__file__) + os.sep
    orig, calls, found = P.pretrain_step, {"n": 0}, []

    def counted(run, batch):
        calls["n"] += 1  # steps 3 … steps−1 are watched whole: from one step's start to the next's
        torch.cuda.set_sync_debug_mode("warn" if 3 <= calls["n"] < steps else "default")
        return orig(run, batch)

    def record(message, category, filename, lineno, file=None, line=None):
        if "synchroniz" not in str(message):
            return
        # the call site: the innermost frame outside torch's own Python, the warnings machinery
        # and this hook
        frames = [f for f in traceback.extract_stack()[:-1]
                  if not f.filename.startswith(torch_dir) and f.filename != warnings.__file__]
        site = frames[-1] if frames else None
        mine = site is not None and site.filename.startswith(ours)
        name = "?" if site is None else (site.filename[len(repo) + 1:] if mine else site.filename)
        found.append({"step": calls["n"], "ours": mine, "where": f"{name}:{getattr(site, 'lineno', 0)} "
                      f"{getattr(site, 'line', '')}", "message": str(message)[:200]})

    P.pretrain_step = counted
    warnings.showwarning = record
    warnings.simplefilter("always")
    try:
        P.run_pretrain(cfg)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    with open(os.path.join(out_dir, "syncs.json"), "w") as f:
        json.dump({"watched_steps": list(range(3, steps)), "syncs": found}, f, indent=1)


def signal_in_save(out_dir: str, overrides: list[str]) -> None:
    """Fine-tuning through the CLI whose save number ``SIGNAL_SAVE`` (1-based) gets a SIGTERM while
    it runs (before DeepSpeed writes): a scheduler's signal during an epoch's (or the final)
    checkpoint. Exits with the CLI's status."""
    import signal

    import engine.runner
    from engine import cli

    orig, calls, at = engine.runner.Run.save, {"n": 0}, int(os.environ["SIGNAL_SAVE"])

    def save(self, tag=None, **kwargs):
        calls["n"] += 1
        if calls["n"] == at:
            os.kill(os.getpid(), signal.SIGTERM)
        return orig(self, tag, **kwargs)

    engine.runner.Run.save = save
    sys.exit(cli.main(["finetune", "-c", os.path.join(os.path.dirname(__file__), "tiny.yaml"),
                       f"train.output_dir={out_dir}", *overrides]))


if __name__ == "__main__":
    mode, out = sys.argv[1], sys.argv[2]
    {"zero": zero, "nonfinite": nonfinite, "evalfail": evalfail, "syncs": syncs,
     "signal_in_save": signal_in_save}[mode](out, sys.argv[3:])
