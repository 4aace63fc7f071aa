"""One run per output folder: what a start does with what ``train.output_dir`` already holds
(``engine.runner.prepare_output_dir``, ``engine.checkpoint``).

- a new run (no ``--resume``) in a folder with checkpoints is a config error naming what is there,
  unless ``train.overwrite=true``, which removes the previous run's outputs first; pruning never
  deletes the tag just saved nor tags with a larger step (the audit: a new run's step5/step6 were
  deleted right after saving, beside an old finished run's step20/step24);
- ``--resume PATH`` takes a run folder, its ``checkpoints/`` folder, ``checkpoints/latest``, a tag
  folder or a tag name; anything else is a config error listing the available tags;
- resuming with a changed model or input geometry is a config error (``key: saved -> now``), other
  changes one warning line;
- an interrupted re-save (``best`` moved to ``best.old``, killed before the new one was renamed in)
  is repaired at the next start, stale temporary folders are removed, and ``latest`` naming a
  missing tag falls back to the newest complete step tag;
- resuming an older tag sets the newer ones aside (``*.superseded``), which no look-up then sees;
- end to end (``python -m engine``): the refusal (exit 2), ``--resume auto`` of a finished run (no
  training, save or evaluation), going back to an older tag, and a finished fine-tuning run.
"""
from __future__ import annotations

import json
import os
import shutil
import sys

import pytest
import torch

from tests.engine.test_train import TINY, _run, env  # noqa: F401 (env: a fixture)

from engine import cli
from engine.config import ConfigError, config_to_yaml, load_config


def _tag(out: str, tag: str, step: int, config_yaml: str = "", weights: bool = True, state: bool = True,
         batches: int = 0) -> str:
    """A checkpoint tag as save_checkpoint leaves it (tiny files in DeepSpeed's and our names);
    ``batches``: the batches per epoch of its data layout (0: a state without one, as older runs')."""
    path = os.path.join(out, "checkpoints", tag)
    os.makedirs(path, exist_ok=True)
    if state:
        rank_state = {"train_state": {"step": step}, "loader": {"world_size": 1}}
        if batches:
            rank_state["data_layout"] = {"num_batches": batches}
        torch.save(rank_state, os.path.join(path, "engine_state_r00000.pt"))
    if weights:
        torch.save({"module": {}}, os.path.join(path, "mp_rank_00_model_states.pt"))
    if config_yaml:
        with open(os.path.join(path, "config.yaml"), "w") as f:
            f.write(config_yaml)
    return path


def _latest(out: str, tag: str) -> None:
    with open(os.path.join(out, "checkpoints", "latest"), "w") as f:
        f.write(tag)


class _SavingEngine:
    """What save_checkpoint needs of a DeepSpeed engine: it writes its model file into the tag."""

    def save_checkpoint(self, ckpt_dir, tag, client_state, save_latest):
        os.makedirs(os.path.join(ckpt_dir, tag), exist_ok=True)
        torch.save({"module": {}}, os.path.join(ckpt_dir, tag, "mp_rank_00_model_states.pt"))


def _save(out: str, step: int, keep: int, tag: str = "") -> None:
    from engine.checkpoint import save_checkpoint

    save_checkpoint(_SavingEngine(), out, tag or f"step{step:08d}", rank_state={"train_state": {"step": step}},
                    config_yaml="x: 1\n", keep=keep, update_latest=not tag)


def _cfg(out, *overrides):
    return load_config(TINY, [f"train.output_dir={out}", *overrides])


def _ls(out: str) -> list[str]:
    return sorted(os.listdir(os.path.join(out, "checkpoints")))


# ---- pruning and a new run in a used folder ---------------------------------------------------------
def test_pruning_keeps_the_new_tag_and_never_touches_newer_ones(tmp_path):
    from engine.checkpoint import find_latest

    out = str(tmp_path)
    _tag(out, "step00000020", 20)
    _tag(out, "step00000024", 24)
    _latest(out, "step00000024")
    for step in (5, 6):  # the audit: these were deleted right after saving (tags sorted by name)
        _save(out, step, keep=2)
        assert os.path.isdir(os.path.join(out, "checkpoints", f"step{step:08d}"))
        assert find_latest(out) == f"step{step:08d}"
    _save(out, 7, keep=2)  # the usual pruning: the newest `keep` up to the one just saved
    assert _ls(out) == ["latest", "step00000006", "step00000007", "step00000020", "step00000024"]
    _save(out, 0, keep=1, tag="best")  # a non-step tag prunes nothing with keep=0 (Run.save), all but 1 here
    assert _ls(out) == ["best", "latest", "step00000024"]
    # steps compare as numbers, not names (9 digits after 99999999)
    _tag(out, "step99999999", 99999999)
    _save(out, 100000000, keep=2)
    assert _ls(out) == ["best", "latest", "step100000000", "step99999999"]


def test_a_new_run_in_a_used_folder_stops_unless_overwrite(tmp_path, capsys):
    from engine.runner import prepare_output_dir

    out = str(tmp_path / "run")
    _tag(out, "step00000020", 20)
    _tag(out, "step00000024", 24)
    _latest(out, "step00000024")
    for name in ("metrics.jsonl", "classes.json", "backbone.safetensors", "backbone.evals.jsonl", "notes.txt"):
        (tmp_path / "run" / name).write_text("{}\n")
    os.makedirs(tmp_path / "run" / "tb")
    with pytest.raises(ConfigError, match=r"train.output_dir=.*run already holds a run \(checkpoints step00000020, "
                                          r"step00000024; latest step00000024\): continue it with --resume auto, "
                                          r"choose another train.output_dir, or set train.overwrite=true"):
        prepare_output_dir(_cfg(out), None)
    assert _ls(out) == ["latest", "step00000020", "step00000024"]  # nothing touched
    # continuing another run's checkpoint into this folder would mix them just the same
    other = str(tmp_path / "other")
    _tag(other, "step00000003", 3)
    with pytest.raises(ConfigError, match="already holds a run .*: choose another train.output_dir"):
        prepare_output_dir(_cfg(out), other)
    capsys.readouterr()
    plan = prepare_output_dir(_cfg(out, "train.overwrite=true"), None)
    assert plan.tag is None
    assert ("train.overwrite=true: removed the previous run's checkpoints/, metrics.jsonl, classes.json, tb/, "
            "backbone.safetensors, backbone.evals.jsonl") in capsys.readouterr().out
    assert sorted(os.listdir(out)) == ["notes.txt"]  # the user's own files stay
    # --resume auto in a folder without checkpoints starts fresh; so does a folder that never existed
    assert prepare_output_dir(_cfg(out), "auto").tag is None
    assert prepare_output_dir(_cfg(str(tmp_path / "new")), None).tag is None


def test_resume_auto_with_only_best_names_the_tag_to_resume(tmp_path, capsys):
    """Regression: fine-tuning that stopped before its first step checkpoint leaves only ``best``;
    ``--resume auto`` (which takes step tags only) printed "no complete checkpoint ...; starting
    fresh", then a config error telling the user to continue with ``--resume auto``."""
    from engine.runner import prepare_output_dir

    out = str(tmp_path / "run")
    _tag(out, "best", 6)
    for resume in ("auto", None):
        with pytest.raises(ConfigError) as e:
            prepare_output_dir(_cfg(out), resume)
        assert "continue it with --resume best (--resume auto takes the newest step checkpoint only" in str(e.value)
        assert "--resume auto," not in str(e.value)
    assert "starting fresh" not in capsys.readouterr().out
    assert prepare_output_dir(_cfg(out), "best").tag == "best"


# ---- --resume PATH ------------------------------------------------------------------------------------
def test_resume_paths_resolve_to_a_complete_tag(tmp_path, capsys):
    from engine.checkpoint import resolve_resume
    from engine.runner import prepare_output_dir

    run = str(tmp_path / "run")
    ck = os.path.join(run, "checkpoints")
    _tag(run, "step00000003", 3)
    _tag(run, "step00000006", 6)
    _tag(run, "best", 3)
    _latest(run, "step00000006")
    want = (ck, "step00000006")
    for p in ("auto", run, run + "/", ck, os.path.join(ck, "latest"), os.path.join(ck, "step00000006"),
              os.path.join(ck, "step00000006") + "/", "step00000006"):
        assert resolve_resume(p, run) == want, p
    assert resolve_resume("best", run) == (ck, "best")
    assert resolve_resume(os.path.join(ck, "step00000003"), str(tmp_path / "elsewhere")) == (ck, "step00000003")
    available = r"available under .*run/checkpoints: step00000003, step00000006, best \(or --resume auto"
    for bad, why in ((str(tmp_path / "nope"), "no such path"), ("step00000009", "no checkpoint tag 'step00000009'"),
                     (str(tmp_path), "not a run directory")):
        with pytest.raises(ConfigError, match=f"--resume {bad}: .*{why}.*{available}"):
            resolve_resume(bad, run)
    (tmp_path / "weights.pt").write_bytes(b"")
    with pytest.raises(ConfigError, match="a file, not a checkpoint"):
        resolve_resume(str(tmp_path / "weights.pt"), run)
    _tag(run, "step00000009", 9, weights=False)  # our state without DeepSpeed's files: not loadable
    with pytest.raises(ConfigError, match=r"step00000009 is not a complete checkpoint of this engine \(no "
                                          r"\*model_states.pt\)"):
        resolve_resume("step00000009", run)
    # another run's checkpoint into a new folder: allowed, and said
    plan = prepare_output_dir(_cfg(str(tmp_path / "new")), run)
    assert (plan.ckpt_dir, plan.tag, plan.own) == (ck, "step00000006", False)
    assert f"resume: continuing checkpoint {ck}/step00000006 of another run" in capsys.readouterr().out


# ---- config changes on resume ---------------------------------------------------------------------------
@pytest.mark.parametrize("change, key", [
    ("model.overrides.embed_dim=48", "model.overrides.embed_dim: <unset> -> 48"),
    ("data.crop_size=96", "data.crop_size: 64 -> 96"),
    ("data.num_frames=4", "data.num_frames: 8 -> 4"),
    ("model.name=vit_tiny", "model.name: mvitv2_tiny -> vit_tiny"),
])
def test_a_changed_model_on_resume_is_a_config_error(tmp_path, change, key):
    from engine.runner import prepare_output_dir

    out = str(tmp_path)
    _tag(out, "step00000003", 3, config_yaml=config_to_yaml(_cfg(out)))
    with pytest.raises(ConfigError, match=rf"step00000003 holds another model .*: {key}\. Resume with the saved"):
        prepare_output_dir(_cfg(out, change, "optim.lr=2e-3"), "auto")


def test_other_config_changes_on_resume_are_one_warning(tmp_path):
    from engine.checkpoint import check_resume_config
    from engine.config import config_to_dict

    out = str(tmp_path)
    path = _tag(out, "step00000003", 3, config_yaml=config_to_yaml(_cfg(out)))
    now = _cfg(str(tmp_path / "x"), "optim.lr=2e-3", "data.batch_size=4", "data.sampling_rate=2", "log.every_steps=5",
               "train.stop_after_steps=9", "model.overrides.attn_backend=reference", "model.drop_path=0.1")
    line = check_resume_config(path, config_to_dict(now))
    assert line.startswith(f"warning: resume: the config differs from the checkpoint's ({path}/config.yaml): ")
    assert line.endswith("; continuing with the new values")
    changes = line.split("): ", 1)[1].split("; continuing")[0].split(", ")
    assert sorted(changes) == sorted(["model.drop_path: None -> 0.1", "model.overrides.attn_backend: <unset> -> "
                                      "reference", "data.sampling_rate: 4 -> 2", "data.batch_size: 2 -> 4",
                                      "optim.lr: 0.001 -> 0.002"])  # output_dir, log.*, stop_after_steps: ignored
    assert check_resume_config(path, config_to_dict(_cfg(str(tmp_path / "y"), "log.jsonl=false"))) is None
    # a run saved with a relative data.root, resumed from the same folder, where the CLI now makes it absolute
    rel = str(tmp_path / "rel")
    path = _tag(rel, "step00000003", 3, config_yaml=config_to_yaml(_cfg(rel, "data.root=data/k400",
                                                                        "finetune.pretrained=w.safetensors")))
    same = _cfg(rel, f"data.root={os.path.abspath('data/k400')}", "finetune.pretrained=/elsewhere/w.safetensors")
    assert check_resume_config(path, config_to_dict(same)) is None
    assert "data.root: data/k400 -> /other" in check_resume_config(path, config_to_dict(_cfg(rel, "data.root=/other")))
    # the random streams are restored from the checkpoint: a new train.seed does not take effect
    line = check_resume_config(path, config_to_dict(_cfg(str(tmp_path / "z"), "train.seed=5")))
    assert "train.seed: 0 -> 5; continuing with the new values (train.seed seeds a fresh start only" in line
    # an image variant has no frames: its data.num_frames does not reach the model
    img = str(tmp_path / "img")
    path = _tag(img, "step00000003", 3, config_yaml=config_to_yaml(_cfg(img, "model.name=mvitv2_tiny_image")))
    line = check_resume_config(path, config_to_dict(_cfg(img, "model.name=mvitv2_tiny_image", "data.num_frames=4")))
    assert "data.num_frames: 8 -> 4" in line


def test_geometry_overrides_given_as_the_data_makes_them_are_no_change(tmp_path):
    """model.overrides.img_size / num_frames given on one side only, equal to what the other side's
    data.crop_size / data.num_frames makes them: the same model, which a resume refused as a shape change."""
    from engine.checkpoint import config_changes
    from engine.config import config_to_dict

    saved = config_to_dict(_cfg(str(tmp_path), "data.crop_size=64", "data.num_frames=8"))
    same = config_to_dict(_cfg(str(tmp_path), "data.crop_size=64", "data.num_frames=8", "model.overrides.img_size=64",
                               "model.overrides.num_frames=8"))
    assert config_changes(saved, same) == ([], []) and config_changes(same, saved) == ([], [])
    other = config_to_dict(_cfg(str(tmp_path), "data.crop_size=64", "model.overrides.img_size=96"))
    assert config_changes(saved, other)[0] == ["model.overrides.img_size: <unset> -> 96"]


# ---- interrupted saves ----------------------------------------------------------------------------------
def test_an_interrupted_resave_is_repaired_at_start(tmp_path, capsys):
    from engine.checkpoint import find_latest
    from engine.runner import prepare_output_dir

    out = str(tmp_path)
    ck = os.path.join(out, "checkpoints")
    _tag(out, "step00000003", 3)
    _tag(out, "step00000003.old", 3)  # a finished re-save's earlier tag (another step unit), not yet set aside
    _tag(out, "step00000006.old", 6)  # killed between the two renames of a re-save of step 6
    _tag(out, "best.old", 6)
    os.makedirs(os.path.join(ck, ".tmp-step00000009"))
    _latest(out, "step00000006")
    (tmp_path / "checkpoints" / "latest.tmp123").write_text("step0000")
    assert find_latest(out) == "step00000003"  # `latest` names a missing tag: the newest complete one
    plan = prepare_output_dir(_cfg(out), "auto")
    assert plan.tag == "step00000006"
    msg = capsys.readouterr().out
    assert f"checkpoints {ck}: restored best, step00000006 from best.old, step00000006.old" in msg
    assert "set aside the earlier step00000003 as step00000003.superseded" in msg
    assert "removed 2 stale folder(s)/file(s) of interrupted saves (.tmp-step00000009, latest.tmp123)" in msg
    assert _ls(out) == ["best", "latest", "step00000003", "step00000003.superseded", "step00000006"]


def test_a_stop_between_the_rename_and_latest_keeps_the_new_tag(tmp_path, monkeypatch, capsys):
    """The new tag was synced and renamed into place, then `latest` written: a stop in between (two
    fsyncs, slow on a parallel filesystem) left `latest` on the previous tag, and --resume auto went
    back to it and set the complete new tag aside as newer: a checkpoint interval lost. The save now
    names the tag in `latest.next` before the rename; that name wins while its tag is complete."""
    from engine import checkpoint
    from engine.runner import prepare_output_dir

    out = str(tmp_path)
    ck = os.path.join(out, "checkpoints")
    _save(out, 3, keep=0)
    assert _ls(out) == ["latest", "step00000003"]  # (removed once `latest` names the tag)
    write = checkpoint.write_text_atomic

    def stopped(path, text):
        if os.path.basename(path) == "latest":
            raise KeyboardInterrupt  # the stop, after the rename
        write(path, text)

    monkeypatch.setattr(checkpoint, "write_text_atomic", stopped)
    with pytest.raises(KeyboardInterrupt):
        _save(out, 6, keep=0)
    monkeypatch.setattr(checkpoint, "write_text_atomic", write)
    assert open(os.path.join(ck, "latest")).read() == "step00000003"
    assert checkpoint.find_latest(out) == "step00000006"  # export, eval and --resume auto read it so
    plan = prepare_output_dir(_cfg(out), "auto")
    assert plan.tag == "step00000006" and "latest set to step00000006" in capsys.readouterr().out
    assert _ls(out) == ["latest", "step00000003", "step00000006"]
    assert open(os.path.join(ck, "latest")).read() == "step00000006"
    # a step tag saved again (a resume with another global batch: the old one is set aside), stopped
    # between `latest.next` and the rename: it must not name the old tag, which still stood there
    # when `latest.next` was written before the set-aside (--resume auto went back to the old unit)
    _tag(out, "step00000008", 8)  # the old unit's step 8

    def marked(path, text):
        write(path, text)
        if os.path.basename(path) == "latest.next":
            raise KeyboardInterrupt  # the stop, before the rename

    monkeypatch.setattr(checkpoint, "write_text_atomic", marked)
    with pytest.raises(KeyboardInterrupt):
        _save(out, 8, keep=0)
    monkeypatch.setattr(checkpoint, "write_text_atomic", write)
    assert checkpoint.find_latest(out) == "step00000006"
    assert prepare_output_dir(_cfg(out), "auto").tag == "step00000006"
    # stopped before the rename: `latest.next` names a tag that is not there; the previous one stands
    os.makedirs(os.path.join(ck, ".tmp-step00000009"))
    with open(os.path.join(ck, "latest.next"), "w") as f:
        f.write("step00000009")
    assert checkpoint.find_latest(out) == "step00000006"
    assert prepare_output_dir(_cfg(out), "auto").tag == "step00000006"
    # the old unit's step 8, moved to .old for the re-save, is back where it was before the save
    assert _ls(out) == ["latest", "step00000003", "step00000006", "step00000008"]


def test_a_stop_while_resaving_the_resumed_step_tag_keeps_it(tmp_path, monkeypatch, capsys):
    """After a resume with another global batch, the first save of a step number the old unit used (often
    the tag resumed from, which `latest` names) set the old tag aside as ``.superseded`` first: a stop
    before the rename left `latest` naming a missing tag, which nothing put back, and --resume auto
    started afresh (exit 0, metrics dropped). The old tag now waits as ``.old`` until the new one is in
    place, then is set aside."""
    from engine import checkpoint
    from engine.runner import prepare_output_dir

    out = str(tmp_path)
    _tag(out, "step00000004", 4, batches=10)  # the old unit's, resumed from
    _latest(out, "step00000004")
    write = checkpoint.write_text_atomic

    def stopped(path, text):
        if os.path.basename(path) == "latest.next":
            raise KeyboardInterrupt  # the stop, before the new tag's rename
        write(path, text)

    monkeypatch.setattr(checkpoint, "write_text_atomic", stopped)
    with pytest.raises(KeyboardInterrupt):
        _save(out, 4, keep=0)
    monkeypatch.setattr(checkpoint, "write_text_atomic", write)
    plan = prepare_output_dir(_cfg(out), "auto")
    assert plan.tag == "step00000004" and "restored step00000004 from step00000004.old" in capsys.readouterr().out
    assert _ls(out) == ["latest", "step00000004"]
    assert torch.load(os.path.join(out, "checkpoints", "step00000004", "engine_state_r00000.pt"),
                      weights_only=False)["data_layout"] == {"num_batches": 10}  # the old one
    # a stop after the rename, before the old tag was set aside: the next start sets it aside
    _save(out, 4, keep=0)
    assert _ls(out) == ["latest", "step00000004", "step00000004.superseded"]
    os.replace(os.path.join(out, "checkpoints", "step00000004.superseded"),
               os.path.join(out, "checkpoints", "step00000004.old"))
    prepare_output_dir(_cfg(out), "auto")
    assert "set aside the earlier step00000004 as step00000004.superseded" in capsys.readouterr().out
    assert _ls(out) == ["latest", "step00000004", "step00000004.superseded"]
    assert "data_layout" not in torch.load(os.path.join(out, "checkpoints", "step00000004", "engine_state_r00000.pt"),
                                           weights_only=False)  # the new one
    shutil.copytree(os.path.join(out, "checkpoints", "step00000004"), os.path.join(out, "checkpoints", "step00000004.old"))
    prepare_output_dir(_cfg(out), "auto")  # the name taken: the message says the one it went to
    assert "set aside the earlier step00000004 as step00000004.superseded-2" in capsys.readouterr().out


def test_a_prune_stopped_half_way_leaves_no_complete_looking_tag(tmp_path, monkeypatch):
    """``rmtree`` in directory order could delete a ZeRO-1 tag's config.yaml and optimiser shards
    and stop (a kill) before its rank state and model states: the rest read as a complete ZeRO-0
    tag. Pruning now deletes those marker files first."""
    from engine import checkpoint

    out = str(tmp_path)
    path = _tag(out, "step00000002", 2, config_yaml=config_to_yaml(_cfg(out, "deepspeed.zero_stage=1")))
    torch.save({}, os.path.join(path, "zero_pp_rank_0_mp_rank_00_optim_states.pt"))
    _tag(out, "step00000004", 4)
    ck = os.path.join(out, "checkpoints")
    assert checkpoint.available_tags(ck) == ["step00000002", "step00000004"]

    def killed(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint.shutil, "rmtree", killed)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.remove_tag(path)
    assert checkpoint.available_tags(ck) == ["step00000004"] and checkpoint.find_latest(out) == "step00000004"
    # a damaged tag's error names every complete checkpoint, newer ones too
    err = checkpoint._damaged(ck, "step00000002", None, None)
    assert "complete checkpoints: step00000004" in str(err) and "resume an older one" not in str(err)


def test_a_save_that_cannot_make_its_folder_is_a_write_failure(tmp_path, monkeypatch):
    """DeepSpeed logs and swallows its own makedirs error; its torch.save then raised "Parent directory
    ... does not exist", a RuntimeError the run took for a bug (a traceback, exit 1, where a full disk
    or a read-only folder is exit 7). The folder is made first now: the OSError itself comes out."""
    from engine import checkpoint

    real = os.makedirs

    def full(path, *a, **k):
        if ".tmp-step" in str(path):
            raise OSError(28, "No space left on device", path)
        return real(path, *a, **k)

    class Swallowing:  # as DeepSpeed's _create_checkpoint_file: the error logged, then torch.save
        def save_checkpoint(self, ckpt_dir, tag, client_state, save_latest):
            try:
                os.makedirs(os.path.join(ckpt_dir, tag), exist_ok=True)
            except OSError:
                pass
            torch.save({"module": {}}, os.path.join(ckpt_dir, tag, "mp_rank_00_model_states.pt"))

    monkeypatch.setattr(checkpoint.os, "makedirs", full)
    with pytest.raises(OSError, match="No space left"):
        checkpoint.save_checkpoint(Swallowing(), str(tmp_path), "step00000002", rank_state={}, config_yaml="x: 1\n")
    assert checkpoint.find_latest(str(tmp_path)) is None


def test_a_tag_folder_another_node_made_is_fine(tmp_path, monkeypatch):
    """Every node's first rank clears and makes the tag's temporary folder; on a shared filesystem one
    node's mkdir can come between another's rmtree and mkdir (FileExistsError: exit 7, 59 of 200 saves
    in a two-process race)."""
    from engine import checkpoint

    os.makedirs(tmp_path / "checkpoints" / ".tmp-step00000002")
    monkeypatch.setattr(checkpoint.shutil, "rmtree", lambda *a, **k: None)  # the other node's folder stays
    _save(str(tmp_path), 2, keep=0)
    assert checkpoint.find_latest(str(tmp_path)) == "step00000002"


def test_bookkeeping_after_a_complete_save_warns_instead_of_stopping(tmp_path, monkeypatch, caplog):
    """An old tag that cannot be removed (EACCES on a shared filesystem), or a `latest` that cannot be
    written, stopped the run with exit 7 ("saving step10 failed ... the last complete checkpoint is
    step10"), on local rank 0 alone while the other ranks waited in the barrier."""
    import logging

    from engine import checkpoint

    out = str(tmp_path)
    _save(out, 2, keep=1)

    def refused(path):
        raise PermissionError(13, "Permission denied", path)

    monkeypatch.setattr(checkpoint, "remove_tag", refused)
    real_write = checkpoint.write_text_atomic
    monkeypatch.setattr(checkpoint, "write_text_atomic",
                        lambda path, text: refused(path) if path.endswith(os.sep + "latest") else real_write(path, text))
    with caplog.at_level(logging.WARNING, logger="engine.checkpoint"):
        _save(out, 4, keep=1)
    assert "the older step00000002 could not be removed" in caplog.text
    assert "`latest` could not be updated" in caplog.text
    assert checkpoint.find_latest(out) == "step00000004"  # latest.next names it


def test_a_finished_run_without_checkpoints_still_holds_the_folder(tmp_path, capsys):
    """Checkpoints deleted after the export (to save space): a new run there silently dropped the old
    metrics.jsonl and hid its TensorBoard curves. A run that died before its first checkpoint (metrics
    and config only) still restarts there without train.overwrite."""
    from engine.runner import prepare_output_dir

    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"step": 1}\n')
    assert prepare_output_dir(_cfg(str(out)), None).tag is None  # the dead run's case
    (out / "backbone.safetensors").write_bytes(b"x")
    for resume in (None, "auto"):
        with pytest.raises(ConfigError, match=r"holds a finished run's outputs \(backbone.safetensors; no checkpoint"):
            prepare_output_dir(_cfg(str(out)), resume)
    capsys.readouterr()
    prepare_output_dir(_cfg(str(out), "train.overwrite=true"), None)
    assert "removed the previous run's metrics.jsonl, backbone.safetensors" in capsys.readouterr().out
    assert os.listdir(out) == []


def test_resume_auto_over_incomplete_tags_only_says_so(tmp_path):
    """With weights-only tags, --resume auto found nothing to continue and then said "continue it with
    --resume auto"."""
    from engine.runner import prepare_output_dir

    out = str(tmp_path / "run")
    _tag(out, "step00000004", 4, state=False)
    with pytest.raises(ConfigError, match=r"already holds a run \(checkpoints step00000004\): none of them is a "
                                          r"complete checkpoint to continue") as e:
        prepare_output_dir(_cfg(out), "auto")
    assert "--resume auto, " not in str(e.value)


def test_a_read_only_output_folder_is_a_config_error_before_any_work(tmp_path, monkeypatch):
    """A read-only train.output_dir ended the run in a traceback at its first write (config.yaml), after
    the data validated and the model was built. (Root ignores permissions: the write is refused here.)"""

    from engine.runner import prepare_output_dir

    out = tmp_path / "run"
    _tag(str(out), "step00000002", 2)
    real = os.open

    def read_only(path, *a, **k):
        if ".maskfeat-write-test" in str(path):
            raise PermissionError(13, "Permission denied", str(path))
        return real(path, *a, **k)

    monkeypatch.setattr(os, "open", read_only)
    with pytest.raises(ConfigError, match=r"train.output_dir=.*run: cannot write in .*run \(PermissionError"):
        prepare_output_dir(_cfg(str(out)), "auto")
    monkeypatch.setattr(os, "open", real)
    assert prepare_output_dir(_cfg(str(out)), "auto").tag == "step00000002"
    assert not [f for f in os.listdir(out) if "write-test" in f]


def test_an_output_dir_that_cannot_be_made_is_a_config_error_before_set_up(tmp_path, monkeypatch):
    """A train.output_dir that is a file, lies under a file, or whose parent refuses a new folder got past
    the check (it tested existing folders only): a traceback at the run's makedirs, after the data, the
    model and DeepSpeed were set up (other ranks waited in a collective)."""
    from engine.runner import prepare_output_dir

    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(ConfigError, match=r"afile: it exists and is not a folder; .*choose another"):
        prepare_output_dir(_cfg(str(afile)), None)
    with pytest.raises(ConfigError, match=r"afile/sub: .*afile is a file, not a folder"):
        prepare_output_dir(_cfg(str(afile / "sub")), None)
    real = os.open

    def refused(path, *a, **k):
        if ".maskfeat-write-test" in str(path):
            raise PermissionError(1, "Operation not permitted", str(path))
        return real(path, *a, **k)

    (tmp_path / "ro").mkdir()
    monkeypatch.setattr(os, "open", refused)
    with pytest.raises(ConfigError, match=r"new/run: a folder cannot be made in .*ro \(PermissionError: Operation"):
        prepare_output_dir(_cfg(str(tmp_path / "ro" / "new" / "run")), None)
    monkeypatch.setattr(os, "open", real)
    prepare_output_dir(_cfg(str(tmp_path / "ro" / "new" / "run")), None)
    assert os.listdir(tmp_path / "ro") == []  # (the probe folder is gone; the run's folder is made later)
    (tmp_path / "ro" / f".maskfeat-write-test-{os.getpid()}").mkdir()  # another job's of the same pid (a container)
    prepare_output_dir(_cfg(str(tmp_path / "ro" / "new" / "run")), None)  # (a unique name: no false error)


def test_export_says_what_it_wrote(tmp_path, capsys, monkeypatch):
    """A fine-tuned run exported as a 'backbone' kept its head, an earlier export was replaced, and
    --keep-head (pre-training only) was taken: all silently."""
    path = _tag(str(tmp_path), "step00000001", 1)
    torch.save({"module": {"head.weight": torch.ones(2, 2), "blocks.0.w": torch.ones(3)}},
               os.path.join(path, "mp_rank_00_model_states.pt"))
    assert cli.main(["export", str(tmp_path), "--keep-head"]) == 0
    out = capsys.readouterr().out
    assert "(a fine-tuned classifier: exported whole, its head included; --keep-head concerns pre-training" in out
    assert cli.main(["export", str(tmp_path)]) == 0
    assert out.endswith("only)\n") and capsys.readouterr().out.endswith("its head included; replaced the earlier file)\n")
    # --out naming a folder not made yet (a traceback: safetensors' own error, not an OSError)
    assert cli.main(["export", str(tmp_path), "--out", str(tmp_path / "new") + os.sep]) == 0
    assert os.path.isfile(tmp_path / "new" / "backbone.safetensors")
    (tmp_path / "file").write_text("x")
    assert cli.main(["export", str(tmp_path), "--out", str(tmp_path / "file" / "b.safetensors")]) == 2
    assert "maskfeat export: cannot write" in capsys.readouterr().err
    import safetensors.torch

    class SafetensorError(Exception):  # what safetensors raises for a full disk
        pass

    def full(*a, **k):
        raise SafetensorError("Error while serializing: IoError(No space left on device)")

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    assert cli.main(["export", str(tmp_path), "--out", str(tmp_path / "c.safetensors")]) == 2
    assert "No space left on device" in capsys.readouterr().err and not os.path.exists(tmp_path / "c.safetensors")


def test_latest_falls_back_to_the_newest_complete_step_tag(tmp_path):
    from engine.checkpoint import available_tags, find_latest, resolve_resume

    out = str(tmp_path)
    _tag(out, "step00000009", 9)
    _tag(out, "step00000010", 10)
    _tag(out, "step00000011", 11, weights=False)  # no DeepSpeed files: never `latest`
    _tag(out, "step00000012.superseded", 12)
    _tag(out, "step00000013.old", 13)
    assert find_latest(out) == "step00000010"
    _latest(out, "step00000011")
    assert find_latest(out) == "step00000010"
    _latest(out, "step00000009")
    assert find_latest(out) == "step00000009"  # `latest` is trusted while its tag is complete
    # one test of completeness for both: a tag without its rank state (or a prune's half-deleted one,
    # without its weights) was `latest` for one and listed complete by the other
    _tag(out, "step00000014", 14, state=False)
    _latest(out, "step00000014")
    assert find_latest(out) == "step00000014"  # (weights: what eval and export read)
    ck = os.path.join(out, "checkpoints")
    for form in ("auto", out, ck, os.path.join(ck, "latest")):  # every form that means "the latest"
        assert resolve_resume(form, out) == (ck, "step00000010"), form
    with open(os.path.join(ck, "latest")) as f:
        assert f.read() == "step00000014"
    assert available_tags(os.path.join(out, "checkpoints")) == ["step00000009", "step00000010"]


# ---- going back in time ---------------------------------------------------------------------------------
def test_resuming_an_older_tag_sets_the_newer_ones_aside(tmp_path):
    from engine.checkpoint import available_tags, find_latest, resolve_resume, set_aside_newer

    out = str(tmp_path)
    ck = os.path.join(out, "checkpoints")
    for s in (2, 4, 6):
        _tag(out, f"step{s:08d}", s)
    _tag(out, "best", 6)  # saved after step 4 too
    _latest(out, "step00000006")
    assert set_aside_newer(ck, 4, "step00000004") == [("step00000006", "step00000006.superseded"),
                                                       ("best", "best.superseded")]
    assert find_latest(out) == "step00000004" and resolve_resume("auto", out) == (ck, "step00000004")
    assert available_tags(ck) == ["step00000002", "step00000004"]
    _tag(out, "step00000006", 6)  # trained again, then back once more: the earlier copy is kept too
    assert set_aside_newer(ck, 2, "step00000002") == [("step00000004", "step00000004.superseded"),
                                                       ("step00000006", "step00000006.superseded-2")]
    assert find_latest(out) == "step00000002"
    _tag(out, "best", 1)
    assert set_aside_newer(ck, 2, "step00000002") == []  # an older best stays


def test_going_back_after_a_batch_change_compares_epochs_not_step_numbers(tmp_path):
    """Batch 2 (4 steps per epoch) saved steps 4 and 6 and best at step 4; a resume with batch 4 (2 per
    epoch) went on from step 6 -> 3 and saved step 3 (epoch 1.5). Resuming that tag set aside step 4
    and best (epoch 1.0: older) because 4 > 3, and kept nothing newer out of the way."""
    from engine.checkpoint import set_aside_newer

    out = str(tmp_path)
    ck = os.path.join(out, "checkpoints")
    _tag(out, "step00000004", 4, batches=4)  # epoch 1.0
    _tag(out, "best", 4, batches=4)
    _tag(out, "step00000006", 6, batches=4)  # epoch 1.5, the tag the batch-4 run resumed
    _tag(out, "step00000003", 3, batches=2)  # epoch 1.5 of the batch-4 run
    _tag(out, "step00000005", 5, batches=2)  # epoch 2.5
    assert set_aside_newer(ck, 3, "step00000003") == [("step00000005", "step00000005.superseded")]
    _tag(out, "step00000005", 5, batches=2)
    assert set_aside_newer(ck, 4, "step00000004") == [("step00000003", "step00000003.superseded"),
                                                       ("step00000005", "step00000005.superseded-2"),
                                                       ("step00000006", "step00000006.superseded")]


# ---- end to end -------------------------------------------------------------------------------------------
def _mtimes(path: str) -> dict[str, int]:
    return {os.path.relpath(os.path.join(d, f), path): os.stat(os.path.join(d, f)).st_mtime_ns
            for d, _, files in os.walk(path) for f in files}


def test_cli_used_folder_finished_run_and_going_back(env, tmp_path):
    out = str(tmp_path / "run")
    common = [sys.executable, "-m", "engine", "pretrain", "-c", TINY, f"train.output_dir={out}",
              "train.checkpoint_every_steps=1", "schedule.max_steps=3"]
    _run(common, env)
    assert _ls(out) == ["latest", "step00000002", "step00000003"]
    p = _run(common, env, ok=(2,))  # a new run in the same folder
    assert "config error: train.output_dir=" in p.stderr and "--resume auto" in p.stderr
    assert "Traceback" not in p.stderr
    before = _mtimes(out)
    p = _run(common + ["--resume", "auto"], env)  # finished: nothing is trained, saved or logged
    assert f"already complete at step 3 (checkpoint {out}/checkpoints/step00000003)" in p.stdout
    assert "done:" not in p.stdout
    after = _mtimes(out)
    assert {k: v for k, v in after.items() if k != "config.yaml"} == {k: v for k, v in before.items()
                                                                        if k != "config.yaml"}
    p = _run(common + ["--resume", "step00000002", "optim.lr=2e-3"], env)  # back to step 2
    assert "optim.lr: 0.001 -> 0.002; continuing with the new values" in p.stderr
    assert "resume: step00000002 is older than step00000003; set aside as step00000003.superseded" in p.stdout
    assert _ls(out) == ["latest", "step00000002", "step00000003", "step00000003.superseded"]
    recs = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    assert [r["step"] for r in recs] == [1, 2, 3]


def test_overwrite_keeps_the_previous_run_when_the_data_does_not_validate(env, tmp_path):
    """train.overwrite=true removed the previous run's checkpoints and logs, then a mistyped
    data.root stopped the run with a data error: the previous run was lost for nothing. The removal
    now waits for the data (the train and evaluation splits) to validate."""
    out = str(tmp_path / "run")
    common = [sys.executable, "-m", "engine", "pretrain", "-c", TINY, f"train.output_dir={out}",
              "train.checkpoint_every_steps=1", "schedule.max_steps=2"]
    _run(common, env)
    before = _ls(out)
    p = _run(common + ["train.overwrite=true", "data.dataset=folder", f"data.root={tmp_path / 'my_vidoes'}"], env,
             ok=(5,))
    assert "data error" in p.stderr and "removed the previous run" not in p.stdout, p.stderr[-2000:]
    assert _ls(out) == before and os.path.isfile(os.path.join(out, "metrics.jsonl"))
    # DeepSpeed's config (a key its section does not have; a section for another precision) is checked
    # before the removal too; the misspelt key was a pydantic traceback (exit 1), now a config error
    for extra, says in (("{zero_optimization: {overlap_com: true}}", "DeepSpeed refuses the config it makes: "
                         "1 validation error for DeepSpeedZeroConfig; overlap_com; Extra inputs are not permitted"),
                        ("{bf16: {immediate_grad_update: true}}", "deepspeed.precision=fp32")):
        p = _run(common + ["train.overwrite=true", f"deepspeed.extra={extra}"], env, ok=(2,))
        assert says in p.stderr and "removed the previous run" not in p.stdout, p.stderr[-2000:]
        assert _ls(out) == before and os.path.isfile(os.path.join(out, "metrics.jsonl"))
    # another run's checkpoint that cannot be continued so (a ZeRO-0 one at stage 1: refused inside its load)
    other = str(tmp_path / "other")
    _run([sys.executable, "-m", "engine", "pretrain", "-c", TINY, f"train.output_dir={other}", "schedule.max_steps=2"],
         env)
    p = _run(common + ["train.overwrite=true", "deepspeed.zero_stage=1", "schedule.max_steps=4", "--resume",
                       os.path.join(other, "checkpoints", "step00000002")], env, ok=(2,))
    assert "saved with deepspeed.zero_stage=0, this run has deepspeed.zero_stage=1" in p.stderr, p.stderr[-2000:]
    assert "removed the previous run" not in p.stdout and _ls(out) == before
    p = _run(common + ["train.overwrite=true"], env)  # with good data it is removed, as before
    assert "train.overwrite=true: removed the previous run's" in p.stdout
    # fine-tuning: a head too narrow for the labels (a check of the model's build) keeps it too, and a
    # run that goes through writes its own classes.json after the removal
    ft = str(tmp_path / "ft")
    common = [sys.executable, "-m", "engine", "finetune", "-c", TINY, f"train.output_dir={ft}", "data.num_clips=1",
              "schedule.max_steps=1"]
    _run(common, env)
    before = _ls(ft)
    p = _run(common + ["train.overwrite=true", "finetune.num_classes=2"], env, ok=(2,))
    assert "finetune.num_classes=2 is smaller than the 3 classes" in p.stderr and "removed the previous run" not in p.stdout, p.stderr[-2000:]
    assert _ls(ft) == before and os.path.isfile(os.path.join(ft, "classes.json"))
    _run(common + ["train.overwrite=true"], env)
    assert json.load(open(os.path.join(ft, "classes.json")))["classes"] == ["bigbuckbunny", "bikes", "carphone_pristine"]


def test_continuing_another_runs_checkpoint_drops_a_dead_runs_records(env, tmp_path):
    """A folder whose run died before its first checkpoint holds its metrics.jsonl; a fresh start there
    dropped it, but continuing another run's step-6 checkpoint kept its records up to step 6 (those
    of the dead run), mixed into the new run's."""
    a, y = str(tmp_path / "a"), str(tmp_path / "y")
    common = [sys.executable, "-m", "engine", "pretrain", "-c", TINY, "train.checkpoint_every_steps=3",
              "schedule.epochs=4", "log.every_steps=1"]
    _run(common + [f"train.output_dir={a}", "schedule.max_steps=6"], env)
    _run(common + [f"train.output_dir={y}", "train.stop_after_steps=2"], env, ok=(3,))
    assert [json.loads(line)["step"] for line in open(os.path.join(y, "metrics.jsonl"))] == [1, 2]
    assert not os.path.isdir(os.path.join(y, "checkpoints", "step00000002"))
    _run(common + [f"train.output_dir={y}", "schedule.max_steps=8", "--resume",
                   os.path.join(a, "checkpoints", "step00000006")], env)
    assert [json.loads(line)["step"] for line in open(os.path.join(y, "metrics.jsonl"))] == [7, 8]


def test_cli_resume_of_a_damaged_checkpoint_names_the_older_ones(env, tmp_path):
    """A node crash before a checkpoint reached the disk leaves empty or cut-short files: --resume
    auto was a traceback (EOFError / PytorchStreamReader) on every try; now a config error naming the
    older complete checkpoints, which resumes as it says."""
    out = str(tmp_path / "run")
    common = [sys.executable, "-m", "engine", "pretrain", "-c", TINY, f"train.output_dir={out}",
              "train.checkpoint_every_steps=1", "schedule.max_steps=3"]
    _run(common, env)
    ck = os.path.join(out, "checkpoints")
    state = os.path.join(ck, "step00000003", "engine_state_r00000.pt")
    weights = os.path.join(ck, "step00000003", "mp_rank_00_model_states.pt")
    good = open(state, "rb").read()
    for damage in ("empty state", "zeroed state", "cut weights"):
        if damage == "empty state":
            open(state, "wb").close()
        elif damage == "zeroed state":  # the size reached the disk, the blocks did not (KeyError in torch.load)
            open(state, "wb").write(bytes(len(good)))
        else:
            open(state, "wb").write(good)
            data = open(weights, "rb").read()
            open(weights, "wb").write(data[: len(data) // 2])
        p = _run(common + ["--resume", "auto"], env, ok=(2,))
        assert f"checkpoint {ck}/step00000003 is damaged (" in p.stderr, p.stderr[-2000:]
        assert "--resume step00000002 (newer tags are then set aside); complete checkpoints: step00000002" in p.stderr
        assert "Traceback" not in p.stderr
    p = _run(common + ["--resume", "step00000002"], env)
    assert "set aside as step00000003.superseded" in p.stdout
    assert _ls(out) == ["latest", "step00000002", "step00000003", "step00000003.superseded"]


def test_cli_finished_finetune_is_not_evaluated_again(env, tmp_path):
    out = str(tmp_path / "ft")
    common = [sys.executable, "-m", "engine", "finetune", "-c", TINY, f"train.output_dir={out}", "data.num_clips=1",
              "schedule.max_steps=1"]
    _run(common, env)
    before = _mtimes(out)
    assert sum(json.loads(line)["split"] == "val" for line in open(os.path.join(out, "metrics.jsonl"))) == 1
    p = _run(common + ["--resume", os.path.join(out, "checkpoints", "latest")], env)
    assert "already complete at step 1" in p.stdout and "val top-1" not in p.stdout + p.stderr
    after = _mtimes(out)
    assert {k: v for k, v in after.items() if k != "config.yaml"} == {k: v for k, v in before.items()
                                                                        if k != "config.yaml"}


def test_latest_writes_of_nodes_with_one_pid_do_not_collide(tmp_path, monkeypatch):
    """The first local rank of every node writes `latest` (and the tag's config.yaml) at once on a
    shared filesystem; in containers those processes can share a pid, and the pid-named temporary
    file was renamed away under one of them (FileNotFoundError: the save failed on that node)."""
    import threading

    from engine.checkpoint import write_text_atomic

    monkeypatch.setattr(os, "getpid", lambda: 1)
    path = str(tmp_path / "latest")
    errors = []

    def write(i):
        try:
            for _ in range(50):
                write_text_atomic(path, f"step{i:08d}")
        except Exception as e:  # what the save would fail on
            errors.append(e)

    threads = [threading.Thread(target=write, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and open(path).read().startswith("step") and os.listdir(tmp_path) == ["latest"]
    umask = os.umask(0)
    os.umask(umask)
    assert os.stat(path).st_mode & 0o777 == 0o666 & ~umask


def _load_worker(rank: int, init: str, outs: list, result: str) -> None:
    from engine.checkpoint import CheckpointError, load_checkpoint

    torch.distributed.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    try:
        load_checkpoint(None, outs[rank], "step00000005", zero_stage=0)
        text = "loaded"
    except CheckpointError as e:
        text = str(e)
    finally:
        torch.distributed.destroy_process_group()
    with open(f"{result}.{rank}", "w") as f:
        f.write(text)


def test_ranks_that_read_different_saves_of_a_tag_stop(tmp_path):
    """Node-local filesystems: a re-save of step 5 stopped after one node's rename and before the
    other's leaves the new tag on the first and, once the start-up repair puts back its ``.old``, the
    earlier one (another step unit) on the second. Each node resumed its own: the ranks trained on
    from different states. They compare what they read first now."""
    import torch.multiprocessing as mp

    outs = [str(tmp_path / "node0"), str(tmp_path / "node1")]
    _tag(outs[0], "step00000005", 5, batches=10)
    _tag(outs[1], "step00000005", 5, batches=20)
    result = str(tmp_path / "result")
    mp.spawn(_load_worker, args=(f"file://{tmp_path / 'store'}", outs, result), nprocs=2, join=True)
    for rank in (0, 1):
        text = open(f"{result}.{rank}").read()
        assert "differs between ranks ((step, batches per epoch) by rank: [(5, 10), (5, 20)])" in text, text
