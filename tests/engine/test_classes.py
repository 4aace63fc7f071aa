"""Class numbering across splits, runs and ``maskfeat eval`` (audit defects 1-7).

The training split defines a run's classes; fine-tuning stores them in ``<run>/classes.json``;
evaluation splits are mapped through that list by name; ``maskfeat eval`` takes K from the
checkpoint, resolves every spelling of a checkpoint path, and writes ``eval.json`` into the
evaluated run. Listing-only tests use empty files (listing never opens them); the others use tiny
H.264 clips written with PyAV and an ``mvitv2_tiny`` classifier at 4 frames of 32x32, saved as a
fake ZeRO-0 DeepSpeed checkpoint (``mp_rank_00_model_states.pt`` holding ``{"module": ...}``).
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import sys

import av
import numpy as np
import pytest
import torch

from engine.config import ConfigError, config_to_yaml, load_config
from engine.data import DataConfig, build_loader, load_dataset, validate_dataset
from engine.data.datasets import ClassListError, read_class_index, write_class_index
from engine.distributed import DistInfo

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = os.path.join(REPO, "tests", "engine", "tiny.yaml")
EXT = (".mp4",)


def touch_tree(root, tree: dict) -> str:
    """``{"train": {"cat": 2}}`` -> root/train/cat/{0,1}.mp4 (empty files: listing only)."""
    for split, classes in tree.items():
        for cls, n in classes.items():
            d = os.path.join(root, split, cls) if split else os.path.join(root, cls)
            os.makedirs(d, exist_ok=True)
            for j in range(n):
                open(os.path.join(d, f"{j}.mp4"), "w").close()
    return str(root)


def write_clip(path: str, n: int = 12, w: int = 64, h: int = 48, shade: int = 0) -> str:
    c = av.open(path, "w")
    s = c.add_stream("libx264", rate=25)
    s.width, s.height, s.pix_fmt = w, h, "yuv420p"
    for i in range(n):
        img = np.full((h, w, 3), (shade + 9 * i) % 256, np.uint8)
        for p in s.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
            c.mux(p)
    for p in s.encode():
        c.mux(p)
    c.close()
    return path


def clip_tree(root, tree: dict) -> str:
    for split, classes in tree.items():
        for cls, n in classes.items():
            d = os.path.join(root, split, cls)
            os.makedirs(d, exist_ok=True)
            for j in range(n):
                write_clip(os.path.join(d, f"{j}.mp4"), shade=40 * j)
    return str(root)


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    """train: apple, bunny, carphone; val lacks bunny (defect 1's case); val2 has an unknown dog."""
    root = tmp_path_factory.mktemp("videos")
    clip_tree(root, {"train": {"apple": 1, "bunny": 1, "carphone": 1}, "val": {"apple": 1, "carphone": 1}})
    other = tmp_path_factory.mktemp("videos_dog")
    clip_tree(other, {"train": {"apple": 1}, "val": {"apple": 1, "dog": 1}})
    return {"root": root, "dog": other}


def data_cfg(root, **kw) -> DataConfig:
    base = dict(root=str(root), dataset="folder", num_frames=4, sampling_rate=1, crop_size=32, batch_size=2,
                num_threads=1, cache_dir=os.path.join(str(root), ".cache"))
    base.update(kw)
    return DataConfig(**base)


# ---- listings (defects 1, 2) -------------------------------------------------------------------
def test_eval_split_folders_are_mapped_through_the_train_classes(tmp_path):
    root = touch_tree(tmp_path, {"train": {"apple": 1, "bunny": 1, "carphone": 1}, "val": {"apple": 1, "carphone": 2}})
    train = load_dataset("folder", root, "train", EXT)
    assert train.class_names == ["apple", "bunny", "carphone"]
    val = load_dataset("folder", root, "val", EXT, classes=train.class_names)
    assert val.class_names == train.class_names
    by_class = {os.path.basename(os.path.dirname(p)): lab for p, lab in zip(val.paths, val.labels)}
    assert by_class == {"apple": 0, "carphone": 2}  # carphone is the model's class 2, not 1
    touch_tree(tmp_path, {"val": {"dog": 1}})
    with pytest.raises(ClassListError, match=r"\['dog'\] are not classes of the training split"):
        load_dataset("folder", root, "val", EXT, classes=train.class_names)


def test_list_labels_out_of_range_name_file_and_line(tmp_path):
    (tmp_path / "train.csv").write_text("a.mp4 0\nb.mp4 1\n")
    (tmp_path / "val.csv").write_text("a.mp4 0\n\nc.mp4 2\n")
    train = load_dataset("kinetics", str(tmp_path), "train", EXT)
    assert train.class_names == ["0", "1"]
    with pytest.raises(ClassListError, match=r"val\.csv:3: label 2 is out of range.*number 2"):
        load_dataset("kinetics", str(tmp_path), "val", EXT, classes=train.class_names)
    assert load_dataset("kinetics", str(tmp_path), "val", EXT, classes=["x", "y", "z"]).labels == [0, 2]


def test_videos_beside_the_class_or_split_folders_are_named_in_a_warning(tmp_path, caplog):
    """Videos lying directly in the root (or in a split folder) beside the class folders are read by no
    listing: a mostly flat folder with one class folder trained on that folder alone, without a word."""
    flat = touch_tree(tmp_path / "f", {"": {"cats": 1}})
    for name in ("loose1.mp4", "Loose2.MP4", "notes.txt"):
        open(os.path.join(flat, name), "w").close()
    split = touch_tree(tmp_path / "s", {"train": {"cats": 1}, "val": {"cats": 1}})
    open(os.path.join(split, "top.mp4"), "w").close()
    open(os.path.join(split, "train", "in_train.mp4"), "w").close()
    with caplog.at_level(logging.WARNING, logger="engine.data.datasets"):
        assert len(load_dataset("folder", flat, "train", EXT).paths) == 1
        assert len(load_dataset("folder", split, "train", EXT).paths) == 1
        before_val = len(caplog.records)
        load_dataset("folder", split, "val", EXT)
    said = [r.getMessage() for r in caplog.records]
    assert any(m.startswith(f"{flat}: 2 file(s) directly in it are not read (Loose2.MP4, loose1.mp4): only files "
                            "under its class folders are") for m in said), said
    assert any(f"{split}: 1 file(s) directly in it are not read (top.mp4): only files under its split folders"
               in m for m in said), said
    assert any(f"train: 1 file(s) directly in it are not read (in_train.mp4)" in m for m in said), said
    assert len(caplog.records) == before_val + 1  # val: only the root's (its own folder has none)


def test_a_folder_that_cannot_be_read_is_named_in_a_warning(tmp_path, caplog, monkeypatch):
    """A class's sub-folder without read permission (shared storage) lost its files without a word.
    (Root reads anything: os.scandir is made to refuse the folder.)"""
    root = touch_tree(tmp_path / "r", {"": {"cats": 1}})
    os.makedirs(os.path.join(root, "cats", "locked"))
    open(os.path.join(root, "cats", "locked", "x.mp4"), "w").close()
    real = os.scandir

    def scandir(path="."):
        if os.path.basename(str(path)) == "locked":
            raise PermissionError(13, "Permission denied", str(path))
        return real(path)

    monkeypatch.setattr(os, "scandir", scandir)
    with caplog.at_level(logging.WARNING, logger="engine.data.datasets"):
        assert len(load_dataset("folder", root, "train", EXT).paths) == 1
    assert "cats: 1 folder(s) cannot be read, their files are not listed: " in caplog.text
    assert "locked (Permission denied)" in caplog.text


def test_missing_split_folder_is_an_error_unless_no_split_folders_exist(tmp_path, caplog):
    root = touch_tree(tmp_path / "a", {"train": {"cat": 1, "dog": 1}})
    with pytest.raises(FileNotFoundError, match=r"a/val not found; the split folders present are \['train'\]"):
        load_dataset("folder", root, "val", EXT)
    flat = touch_tree(tmp_path / "b", {"": {"cat": 1, "dog": 1}})  # root/<class>: every split
    for split in ("train", "val"):
        assert load_dataset("folder", flat, split, EXT).class_names == ["cat", "dog"]
    # ... which says so for the evaluation splits: their accuracy is on the training videos
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="engine.data.datasets"):
        load_dataset("folder", flat, "train", EXT)
        assert not caplog.records
        load_dataset("folder", flat, "val", EXT)
    assert "has no train/val/test folders: the val split reads the same class folders as training" in caplog.text
    with pytest.raises(FileNotFoundError, match=r"set finetune.eval_split=train \(accuracy on the training videos\) "
                                                 r"or add the folder"):
        load_dataset("folder", root, "val", EXT)
    # a held-out split is offered before train (which selected `best` on the training videos)
    tt = touch_tree(tmp_path / "tt", {"train": {"cat": 1, "dog": 1}, "test": {"cat": 1, "dog": 1}})
    with pytest.raises(FileNotFoundError, match=r"\['train', 'test'\] \(set finetune.eval_split=test or add"):
        load_dataset("folder", tt, "val", EXT)
    vt = touch_tree(tmp_path / "vt", {"val": {"cat": 1}, "test": {"cat": 1}})  # no train: no eval_split helps
    with pytest.raises(FileNotFoundError, match=r"vt/train not found; the split folders present are \['val', 'test'\]: "
                                                r"training reads"):
        load_dataset("folder", vt, "train", EXT)


def test_a_folder_of_images_read_as_videos_points_to_image_folder(tmp_path):
    from engine.data.errors import DataError

    for cls in ("cat", "dog"):
        os.makedirs(tmp_path / "train" / cls)
        for j in range(2):
            open(tmp_path / "train" / cls / f"{j}.JPG", "w").close()
    with pytest.raises(DataError, match=r"no files with extensions .*; it holds 4 image file\(s\): an image dataset "
                                        r"is data.dataset=image_folder"):
        load_dataset("folder", str(tmp_path), "train", EXT)


def test_a_class_folder_in_another_unicode_form_is_the_same_class(tmp_path):
    """val/vélo copied on macOS (decomposed, NFD) was "not a class of the training split (... vélo)"."""
    import unicodedata

    nfc, nfd = unicodedata.normalize("NFC", "vélo"), unicodedata.normalize("NFD", "vélo")
    assert nfc != nfd
    root = touch_tree(tmp_path / "u", {"train": {"auto": 1, nfc: 1}, "val": {nfd: 2, "auto": 1}})
    train = load_dataset("folder", root, "train", EXT)
    val = load_dataset("folder", root, "val", EXT, classes=train.class_names)
    assert train.class_names == ["auto", nfc] and sorted(val.labels) == [0, 1, 1]
    with pytest.raises(ClassListError, match=r"\['vel'\] are not classes"):  # another name still is an error
        os.makedirs(os.path.join(root, "val", "vel"))
        load_dataset("folder", root, "val", EXT, classes=train.class_names)


@pytest.mark.parametrize("names", [("Train", "Val"), ("training", "validation"), ("train_", "Test")])
def test_folders_spelt_like_splits_are_not_read_as_classes(tmp_path, names):
    """Train/ and Val/ (or training/validation/) were read as two classes of one folder for every
    split: a "Train vs Val" classifier, trained on the val videos too, with a generic warning only;
    ``data prepare --check`` passed it."""
    from engine.data.errors import DataError
    from engine.data.prepare import _listings

    root = touch_tree(tmp_path / "r", {n: {"cat": 1, "dog": 1} for n in names})
    like = [n for n in names if n.lower() in ("train", "val", "test", "training", "validation")]
    for split in ("train", "val"):
        with pytest.raises(DataError, match=rf"folder\(s\) spelt like splits \({like[0]} -> "):
            load_dataset("folder", root, split, EXT)
    with pytest.raises(DataError, match="spelt like splits"):
        _listings(root)


def test_one_training_class_is_a_config_error(tmp_path):
    """A CSV-layout root run as dataset=folder (or a folder of one class) trained a one-output
    classifier: its softmax is 1 whatever the input, and validation read 100 % top-1."""
    from engine.finetune import _num_classes

    root = clip_tree(tmp_path, {"train": {"clips": 2}})
    train = build_loader(data_cfg(root), "train", mode="finetune")
    with pytest.raises(ConfigError, match=r"the training split has one class \(clips\): a classifier needs at least 2"):
        _num_classes(load_config(TINY, []), train)
    assert _num_classes(load_config(TINY, ["finetune.num_classes=4"]), train) == 4  # a wider head is a choice


def test_class_index_round_trip(tmp_path):
    p = str(tmp_path / "run" / "classes.json")
    write_class_index(p, ["a", "b"], num_classes=5)
    assert read_class_index(p) == (["a", "b"], 5)
    assert json.loads(open(p).read())["index"] == {"a": 0, "b": 1}
    with pytest.raises(ValueError, match="smaller than the 2 class names"):
        write_class_index(p, ["a", "b"], num_classes=1)
    assert not [f for f in os.listdir(tmp_path / "run") if ".tmp" in f]


# ---- loaders (defects 1, 4, 7) -----------------------------------------------------------------
def test_eval_loader_numbers_classes_by_the_train_list(videos):
    cfg = data_cfg(videos["root"])
    train = build_loader(cfg, "train", mode="finetune")
    val = build_loader(cfg, "val", mode="test", classes=train.class_names)
    assert val.num_classes == 3 and val.class_names == ["apple", "bunny", "carphone"]
    assert sorted(zip((os.path.basename(os.path.dirname(p)) for p in val.dataset.paths), val.dataset.labels)) == [
        ("apple", 0), ("carphone", 2)]


def test_empty_and_all_bad_class_folders_are_kept_with_a_warning(tmp_path, caplog):
    root = clip_tree(tmp_path, {"train": {"a": 1, "d": 1}})
    os.makedirs(tmp_path / "train" / "b")  # empty
    os.makedirs(tmp_path / "train" / "c")
    (tmp_path / "train" / "c" / "bad.mp4").write_text("not a video")  # all files bad
    with caplog.at_level(logging.WARNING):
        check = validate_dataset(data_cfg(root, on_bad_file="skip"), "train")
    assert check.dataset.class_names == ["a", "b", "c", "d"] and sorted(check.dataset.labels) == [0, 3]
    warned = [r.getMessage() for r in caplog.records if "no usable files" in r.getMessage()]
    assert len(warned) == 1 and "b, c" in warned[0]


def test_num_classes_below_the_labels_is_a_config_error(videos):
    from engine.finetune import _num_classes

    train = build_loader(data_cfg(videos["root"]), "train", mode="finetune")
    cfg = load_config(TINY, ["finetune.num_classes=2"])
    with pytest.raises(ConfigError, match=r"finetune.num_classes=2 is smaller than the 3 classes .* set "
                                          r"finetune.num_classes >= 3"):
        _num_classes(cfg, train)
    with pytest.raises(ConfigError, match=r"finetune.num_classes=1 is smaller than the 3 classes"):  # not "one class"
        _num_classes(load_config(TINY, ["finetune.num_classes=1"]), train)
    train.dataset.class_names = train.class_names = ["apple", "bunny"]  # labels past the names (a list's numbers)
    with pytest.raises(ConfigError, match=r"finetune.num_classes is 2, but .* has label 2 \(class '2'"):
        _num_classes(cfg, train)
    assert _num_classes(load_config(TINY, ["finetune.num_classes=5"]), train) == 5
    assert _num_classes(load_config(TINY, []), train) == 3


def test_num_classes_below_the_class_names_is_a_config_error(tmp_path):
    """Every label fits finetune.num_classes, but the last class folder holds no video: classes.json
    (an output per name) raised a bare ValueError after the set-up, a traceback."""
    from engine.finetune import _num_classes

    root = clip_tree(tmp_path, {"train": {"a": 1, "b": 1}})
    os.makedirs(tmp_path / "train" / "c")  # empty: the names are a, b, c, the labels 0 and 1
    train = build_loader(data_cfg(root), "train", mode="finetune")
    for k in (1, 2):  # (at 1 the labels' minimum, 2, came first; then this one asked for 3)
        with pytest.raises(ConfigError, match=rf"finetune.num_classes={k} is smaller than the 3 classes"):
            _num_classes(load_config(TINY, [f"finetune.num_classes={k}"]), train)
    assert _num_classes(load_config(TINY, ["finetune.num_classes=3"]), train) == 3


def test_drop_last_never_drops_test_views(videos):
    cfg = data_cfg(videos["root"], drop_last=True, batch_size=2, num_clips=3)
    test = build_loader(cfg, "train", mode="test")  # 3 videos x 3 views = 9: the last batch is padded
    specs = [s for b in test.plan(0) for s in b]
    assert sorted((s.index, s.view) for s in specs if s.valid) == [(i, v) for i in range(3) for v in range(3)]
    train = build_loader(cfg, "train", mode="pretrain")  # training still drops the incomplete batch
    assert len(train) == 1 and all(s.valid for b in train.plan(0) for s in b)


# ---- resume (defect 1) -------------------------------------------------------------------------
def test_class_index_written_then_checked_on_resume(tmp_path):
    from engine.finetune import sync_class_index

    out = str(tmp_path / "run")
    p = sync_class_index(out, ["a", "b"], 2, resuming=False, write=True)
    assert read_class_index(p) == (["a", "b"], 2)
    assert sync_class_index(out, ["a", "b"], 2, resuming=True, write=True) == p  # same classes: fine
    with pytest.raises(ClassListError, match=r"classes changed.*new: \['c'\]"):
        sync_class_index(out, ["a", "b", "c"], 3, resuming=True, write=True)
    with pytest.raises(ClassListError, match=r"classes changed.*same names in another order"):
        sync_class_index(out, ["b", "a"], 2, resuming=True, write=True)
    # the same classes with another finetune.num_classes: said so (it read "same names in another order")
    with pytest.raises(ClassListError, match=r"head had K=2 outputs .*the same 2 classes\) with K=7: set "
                                             r"finetune.num_classes=2"):
        sync_class_index(out, ["a", "b"], 7, resuming=True, write=True)
    sync_class_index(out, ["x"], 1, resuming=False, write=True)  # a fresh run overwrites
    assert read_class_index(p) == (["x"], 1)


# ---- maskfeat eval (defects 3, 5, 6) -----------------------------------------------------------
def _eval_cfg(root, out, *extra):
    return load_config(TINY, [f"data.root={root}", "data.dataset=folder", "data.num_frames=4",
                              "data.sampling_rate=1", "data.crop_size=32", "data.num_clips=1",
                              f"data.cache_dir={os.path.join(str(root), '.cache')}", f"train.output_dir={out}",
                              "train.device=cpu", *extra])


def _classifier(K: int, always: int) -> dict:
    """A state dict of the eval model whose prediction is always class ``always``."""
    from models.variants import create_model

    torch.manual_seed(0)
    m = create_model("mvitv2_tiny", task="classify", num_classes=K, num_frames=4, img_size=32)
    sd = m.state_dict()
    sd["head.projection.weight"] = torch.zeros_like(sd["head.projection.weight"])
    sd["head.projection.bias"] = torch.nn.functional.one_hot(torch.tensor(always), K).float() * 10
    return sd


def _fake_run(run, sd, classes, tags=("step00000001",)) -> str:
    ck = os.path.join(run, "checkpoints")
    for tag in tags:
        os.makedirs(os.path.join(ck, tag))
        torch.save({"module": sd}, os.path.join(ck, tag, "mp_rank_00_model_states.pt"))
    with open(os.path.join(ck, "latest"), "w") as f:
        f.write([t for t in tags if t != "best"][-1])
    if classes is not None:
        write_class_index(os.path.join(run, "classes.json"), classes, int(sd["head.projection.weight"].shape[0]))
    return run


@pytest.fixture
def one_process(monkeypatch):
    import engine.finetune

    monkeypatch.setattr(engine.finetune, "init_distributed",
                        lambda device="auto": DistInfo(0, 1, 0, torch.device("cpu"), "gloo"))


def test_eval_maps_classes_by_name_and_writes_into_the_run(videos, tmp_path, one_process, capsys):
    from engine.finetune import run_eval

    run = _fake_run(str(tmp_path / "ft"), _classifier(3, always=2), ["apple", "bunny", "carphone"])
    cfg = _eval_cfg(videos["root"], tmp_path / "elsewhere")
    res = run_eval(cfg, run)
    # val = {apple, carphone}; the model always says carphone (2): right on 1 of 2 videos only when
    # val's carphone is the model's class 2 (numbering val on its own made it 1: 0 %)
    assert res["videos"] == 2 and res["top1"] == pytest.approx(50.0)
    assert res["checkpoint"] == os.path.join(run, "checkpoints", "step00000001")
    written = os.path.join(run, "eval.json")
    assert json.load(open(written))["top1"] == pytest.approx(50.0)
    assert not os.path.exists(tmp_path / "elsewhere" / "eval.json")
    assert f"eval results written to {written}" in capsys.readouterr().out
    with pytest.raises(ConfigError, match=r"finetune.num_classes=5, but the checkpoint .* has 3 classes"):
        run_eval(_eval_cfg(videos["root"], tmp_path / "x", "finetune.num_classes=5"), run)
    assert run_eval(_eval_cfg(videos["root"], tmp_path / "x", "finetune.num_classes=3"), run)["top1"] == 50.0


def test_eval_of_weights_without_classes_numbers_by_the_train_folders(videos, tmp_path, one_process, capsys, caplog):
    """Weights that carry no class list (an official .pyth, a run without classes.json) had the val
    split numbered on its own: val lacks bunny, so carphone was 1 and the model's 2 was never right
    (top-1 0 where the same weights with their list give 50). Fine-tuning numbers by train's folders."""
    from engine.finetune import run_eval

    run = _fake_run(str(tmp_path / "ft"), _classifier(3, always=2), None)
    assert run_eval(_eval_cfg(videos["root"], tmp_path / "x"), run)["top1"] == pytest.approx(50.0)
    assert "classes numbered as fine-tuning numbers them, by the train split's 3 class folders" in capsys.readouterr().out
    # another number of train classes than the head's outputs: not the model's classes, so the old warning
    two = _fake_run(str(tmp_path / "ft2"), _classifier(2, always=1), None)
    with caplog.at_level(logging.WARNING, logger="engine.finetune"):
        assert run_eval(_eval_cfg(videos["root"], tmp_path / "x"), two)["top1"] == pytest.approx(50.0)
    assert "numbered on their own" in caplog.text
    # a head wider than the train classes (finetune.num_classes above them): still train's numbering
    wide = _fake_run(str(tmp_path / "ft5"), _classifier(5, always=2), None)
    assert run_eval(_eval_cfg(videos["root"], tmp_path / "x"), wide)["top1"] == pytest.approx(50.0)


def test_fine_tuning_from_a_classifier_of_other_classes_starts_a_fresh_head(videos, tmp_path, capsys):
    """An exported classifier (apple, bunny, carphone) fine-tuned on 3 other classes loaded its head
    whole: its row for carphone initialised the new class 2. Its metadata names its classes."""
    from engine.checkpoint import export_backbone
    from engine.finetune import build_classifier

    exported = str(tmp_path / "cls.safetensors")
    export_backbone(_fake_run(str(tmp_path / "ft"), _classifier(3, always=2), ["apple", "bunny", "carphone"]), exported)
    cfg = _eval_cfg(videos["root"], tmp_path / "x", f"finetune.pretrained={exported}")
    bias = torch.nn.functional.one_hot(torch.tensor(2), 3).float() * 10
    same = build_classifier(cfg, 3, classes=["apple", "bunny", "carphone"])
    assert torch.equal(same.state_dict()["head.projection.bias"], bias)
    assert "head starts fresh" not in capsys.readouterr().out
    other = build_classifier(cfg, 3, classes=["bikes", "bunny", "carphone"])
    assert not torch.equal(other.state_dict()["head.projection.bias"], bias)
    assert "its head was fine-tuned on other classes (3: apple, bunny, carphone): the head starts fresh" \
        in capsys.readouterr().out
    assert torch.equal(other.state_dict()["blocks.0.attn.qkv.weight"], same.state_dict()["blocks.0.attn.qkv.weight"])


def test_eval_of_a_damaged_checkpoint_is_one_line(videos, tmp_path, one_process):
    """A truncated or zero-filled model file of a tag folder ended eval in a traceback (exit 1): a
    RuntimeError / KeyError from torch.load; resume and export said "damaged" with exit 2."""
    from engine.checkpoint import CheckpointError
    from engine.finetune import run_eval

    run = _fake_run(str(tmp_path / "ft"), _classifier(3, always=2), ["apple", "bunny", "carphone"],
                    tags=("step00000001", "best"))
    model = os.path.join(run, "checkpoints", "best", "mp_rank_00_model_states.pt")
    for damage in (lambda: os.truncate(model, 1000), lambda: open(model, "wb").write(bytes(4096))):
        damage()
        with pytest.raises(CheckpointError, match=r"checkpoint .*best is damaged \((RuntimeError|KeyError): "):
            run_eval(_eval_cfg(videos["root"], tmp_path / "x"), run)


def test_a_head_whose_classes_differ_only_in_unicode_form_is_kept(tmp_path):
    import unicodedata

    from safetensors.torch import save_file

    from engine.finetune import _drop_head_of_other_classes

    path = str(tmp_path / "cls.safetensors")
    sd = {"head.projection.weight": torch.zeros(2, 4), "blocks.0.x": torch.zeros(1)}
    save_file(sd, path, metadata={"classes": json.dumps({"classes": ["café", "tea"], "num_classes": 2})})
    nfd = [unicodedata.normalize("NFD", "café"), "tea"]
    assert _drop_head_of_other_classes(path, dict(sd), nfd) is None
    other = dict(sd)
    assert "starts fresh" in _drop_head_of_other_classes(path, other, ["cafe", "tea"]) and list(other) == ["blocks.0.x"]


def test_eval_where_results_and_classes_come_from(videos, tmp_path, one_process, monkeypatch, capsys):
    """A read-only folder crashed eval after the whole evaluation (the JSON line was its only record,
    then a traceback); a tag folder copied out of its run read a classes.json two folders up and wrote
    there; a classes.json beside an export beat the one of the run the export names."""
    import shutil

    import engine.checkpoint
    from engine.finetune import resolve_checkpoint, run_eval

    run = _fake_run(str(tmp_path / "ft"), _classifier(3, always=2), ["apple", "bunny", "carphone"])
    real = engine.checkpoint.write_text_atomic

    def read_only(path, text):
        raise PermissionError(30, "Read-only file system", path)

    monkeypatch.setattr(engine.checkpoint, "write_text_atomic", read_only)
    res = run_eval(_eval_cfg(videos["root"], tmp_path / "x"), run)
    out = capsys.readouterr()
    assert res["top1"] == pytest.approx(50.0) and '"top1": 50.0' in out.out
    assert "warning: eval results not all written beside" in out.err and "Read-only file system" in out.err
    monkeypatch.setattr(engine.checkpoint, "write_text_atomic", real)
    # a tag copied out of its run: no run around it
    copy = tmp_path / "copy"
    shutil.copytree(os.path.join(run, "checkpoints", "step00000001"), copy / "x" / "step00000001")
    write_class_index(str(copy / "classes.json"), ["other", "names"], 2)
    t = resolve_checkpoint(str(copy / "x" / "step00000001"))
    assert (t.run_dir, t.class_index, t.eval_json) == (None, None, str(copy / "x" / "step00000001.eval.json"))
    t = resolve_checkpoint(os.path.join(run, "checkpoints", "step00000001"))
    assert (t.run_dir, t.class_index) == (run, os.path.join(run, "classes.json"))
    os.symlink(os.path.join(run, "checkpoints", "step00000001"), copy / "linked")  # a link to a run's tag: that run
    t = resolve_checkpoint(str(copy / "linked"))
    assert (t.run_dir, t.class_index, t.eval_json) == (run, os.path.join(run, "classes.json"),
                                                       os.path.join(run, "eval.json"))
    # an export's own run comes first
    from safetensors.torch import save_file

    exported = copy / "model.safetensors"
    save_file(_classifier(3, always=2), str(exported),
              metadata={"format": "maskfeat-backbone", "source": os.path.join(run, "checkpoints", "step00000001")})
    shutil.copy(copy / "classes.json", copy / "x" / "classes.json")
    assert resolve_checkpoint(str(exported)).class_index == os.path.join(run, "classes.json")
    os.remove(os.path.join(run, "classes.json"))  # the run is gone: the file beside it
    assert resolve_checkpoint(str(exported)).class_index == str(copy / "classes.json")


def test_an_exported_classifier_carries_its_classes(videos, tmp_path, one_process):
    """An export written outside its run found the class names through its metadata's source, the run's
    classes.json: once the folder was reused (train.overwrite) for other classes of the same number, the
    old export was scored through the new names (top-1 50 -> 0, no warning). It carries its own now."""
    from safetensors import safe_open

    from engine.checkpoint import export_backbone
    from engine.finetune import run_eval

    run = _fake_run(str(tmp_path / "ft"), _classifier(3, always=2), ["apple", "bunny", "carphone"])
    exported = str(tmp_path / "elsewhere" / "ft.safetensors")
    export_backbone(run, exported)
    with safe_open(exported, "pt") as f:
        assert json.loads(f.metadata()["classes"])["classes"] == ["apple", "bunny", "carphone"]
    write_class_index(os.path.join(run, "classes.json"), ["apple", "carphone", "dog"], 3)  # the folder reused
    assert run_eval(_eval_cfg(videos["root"], tmp_path / "x"), exported)["top1"] == pytest.approx(50.0)
    backbone = str(tmp_path / "elsewhere" / "backbone.safetensors")  # no head: no classes
    export_backbone(_fake_run(str(tmp_path / "pre"), {"blocks.0.x": torch.zeros(1)}, None), backbone)
    with safe_open(backbone, "pt") as f:
        assert "classes" not in f.metadata()


def test_eval_json_says_what_was_evaluated_and_keeps_the_history(videos, tmp_path, one_process, caplog):
    """eval.json records the split, views, precision and the selection split of ``best`` (a warning
    when it is the split evaluated); every evaluation is appended to evals.jsonl; --save-predictions
    writes the per-video probabilities; non-finite logits are counted and warned about."""
    import numpy as np

    from engine.finetune import run_eval

    sd = _classifier(3, always=2)
    run = _fake_run(str(tmp_path / "ft"), sd, ["apple", "bunny", "carphone"], tags=("step00000001", "best"))
    with open(os.path.join(run, "checkpoints", "best", "config.yaml"), "w") as f:
        f.write("finetune:\n  eval_split: val\n")
    with caplog.at_level(logging.WARNING):
        res = run_eval(_eval_cfg(videos["root"], tmp_path / "x"), run, save_predictions=True)
    assert "selected by its top-1 on split 'val', the split evaluated now" in caplog.text
    saved = json.load(open(os.path.join(run, "eval.json")))
    assert {k: saved[k] for k in ("split", "clips", "crops", "precision", "selected_on", "nonfinite_views",
                                  "left_out", "decode_failures")} == {
        "split": "val", "clips": 1, "crops": 1, "precision": "fp32", "selected_on": "val", "nonfinite_views": 0,
        "left_out": [], "decode_failures": []}
    pred = np.load(os.path.join(run, "eval.predictions.npz"))
    assert pred["probs"].shape == (2, 3) and list(pred["label"]) == [0, 2]  # apple, carphone by the train list
    assert [os.path.basename(os.path.dirname(p)) for p in pred["path"]] == ["apple", "carphone"]
    top1 = (pred["probs"].argmax(1) == pred["label"]).mean() * 100
    assert top1 == pytest.approx(res["top1"])  # the file re-computes the reported number
    sd["head.projection.bias"] = torch.full((3,), float("nan"))
    torch.save({"module": sd}, os.path.join(run, "checkpoints", "step00000001", "mp_rank_00_model_states.pt"))
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        res = run_eval(_eval_cfg(videos["root"], tmp_path / "x"), os.path.join(run, "checkpoints", "latest"))
    assert res["nonfinite_views"] == res["views"] == 2 and "2 of 2 views had non-finite logits" in caplog.text
    assert res["nonfinite_videos"] == 2 and res["top1"] == res["top5"] == 0  # NaN rows' topk scored some right
    assert not os.path.exists(os.path.join(run, "eval.predictions.npz"))  # it belonged to the earlier eval.json
    history = [json.loads(line) for line in open(os.path.join(run, "evals.jsonl"))]
    assert [h["checkpoint"].rsplit(os.sep, 1)[1] for h in history] == ["best", "step00000001"]


def test_eval_refuses_a_model_built_otherwise_than_trained(videos, tmp_path, one_process):
    """``model.overrides.use_mean_pooling`` leaves every shape as it is: a classifier fine-tuned with the
    cls-token head loaded cleanly into a mean-pooling one and was evaluated as that other model. The
    trained config (the tag's config.yaml, an export's metadata) is compared; run-time options are
    free to differ."""
    from safetensors.torch import save_file

    from engine.finetune import run_eval

    run = _fake_run(str(tmp_path / "ft"), _classifier(3, always=2), ["apple", "bunny", "carphone"])
    trained = _eval_cfg(videos["root"], tmp_path / "ft", "model.overrides.use_mean_pooling=false",
                        "model.overrides.attn_backend=reference")
    with open(os.path.join(run, "checkpoints", "step00000001", "config.yaml"), "w") as f:
        f.write(config_to_yaml(trained))
    with pytest.raises(ConfigError, match=r"trained with another model than this config builds: "
                                          r"model.overrides.use_mean_pooling: False -> <unset> \(trained -> now\)"):
        run_eval(_eval_cfg(videos["root"], tmp_path / "x"), run)
    ok = _eval_cfg(videos["root"], tmp_path / "x", "model.overrides.use_mean_pooling=false")  # attn_backend: free
    assert run_eval(ok, run)["top1"] == pytest.approx(50.0)
    path = str(tmp_path / "w" / "model.safetensors")  # an export carries its config in its metadata
    os.makedirs(os.path.dirname(path))
    save_file(_classifier(3, always=2), path, metadata={"config": config_to_yaml(trained)})
    with pytest.raises(ConfigError, match=r"model.overrides.use_mean_pooling: False -> <unset>"):
        run_eval(_eval_cfg(videos["root"], tmp_path / "x"), path)
    # another input size: the position tables do not fit, and the message says which settings size them
    with pytest.raises(ConfigError, match=r"rel_pos.*data.crop_size=64 and data.num_frames=4 here; give the values"):
        run_eval(_eval_cfg(videos["root"], tmp_path / "x", "data.crop_size=64",
                           "model.overrides.use_mean_pooling=false"), run)


def test_eval_rejects_an_eval_class_unseen_in_training(videos, tmp_path, one_process):
    from engine.finetune import run_eval

    run = _fake_run(str(tmp_path / "ft"), _classifier(1, always=0), ["apple"])
    with pytest.raises(ClassListError, match=r"\['dog'\] are not classes of the training split.*that has them$"):
        run_eval(_eval_cfg(videos["dog"], tmp_path / "x"), run)
    # a run trained on other data than this --config reads: said so
    with open(os.path.join(run, "checkpoints", "step00000001", "config.yaml"), "w") as f:
        f.write(config_to_yaml(_eval_cfg(videos["root"], tmp_path / "ft")))
    with pytest.raises(ClassListError, match=rf"\['dog'\] are not classes .* was trained with data.root="
                                             rf"{re.escape(str(videos['root']))}: this evaluation reads other data"):
        run_eval(_eval_cfg(videos["dog"], tmp_path / "x"), run)


def test_eval_of_a_weights_file_takes_k_from_the_head(videos, tmp_path, one_process):
    """A head of 5 outputs (fine-tuned with finetune.num_classes=5) evaluates without repeating the
    override; without a classes.json the classes are numbered as fine-tuning numbered them, by the
    train split's 3 folders (the eval split's own numbering made carphone 1 where training had 2)."""
    from safetensors.torch import save_file

    from engine.finetune import run_eval

    path = str(tmp_path / "w" / "model.safetensors")
    os.makedirs(os.path.dirname(path))
    save_file(_classifier(5, always=2), path)
    res = run_eval(_eval_cfg(videos["root"], tmp_path / "x"), path)
    assert res["top1"] == pytest.approx(50.0)  # train's numbering: apple 0, bunny 1, carphone 2
    assert res["eval_json"] == str(tmp_path / "w" / "model.eval.json") and os.path.isfile(res["eval_json"])
    # its history is its own, not a file shared by every weights file of the folder
    assert sorted(os.listdir(tmp_path / "w")) == ["model.eval.json", "model.evals.jsonl", "model.safetensors"]
    save_file(_classifier(1, always=0), path)  # a head too narrow for the eval split's labels
    with pytest.raises(ClassListError, match=r"has label 1 \(class 'carphone'.*not trained on"):
        run_eval(_eval_cfg(videos["root"], tmp_path / "x"), path)


def test_checkpoint_paths_resolve_like_the_run_dir(tmp_path):
    from engine.finetune import resolve_checkpoint

    sd = {"head.projection.weight": torch.zeros(2, 1)}
    run = _fake_run(str(tmp_path / "r"), sd, ["a", "b"], tags=("step00000001", "step00000002"))
    ck = os.path.join(run, "checkpoints")
    want = os.path.join(ck, "step00000002")
    for p in (run, ck, os.path.join(ck, "latest"), want, want + "/"):
        t = resolve_checkpoint(p)
        assert (t.where, t.run_dir, t.eval_json) == (want, run, os.path.join(run, "eval.json")), p
        assert t.class_index == os.path.join(run, "classes.json")
    assert resolve_checkpoint(os.path.join(ck, "step00000001")).where == os.path.join(ck, "step00000001")
    os.makedirs(os.path.join(ck, "best"))
    torch.save({"module": sd}, os.path.join(ck, "best", "mp_rank_00_model_states.pt"))
    assert resolve_checkpoint(run).tag == resolve_checkpoint(ck).tag == "best"  # best, else latest
    assert resolve_checkpoint(os.path.join(ck, "latest")).tag == "step00000002"  # the tag `latest` names
    # a tag's model-states file is that tag (it was a bare weights file: no classes.json, labels shifted)
    t = resolve_checkpoint(os.path.join(ck, "step00000001", "mp_rank_00_model_states.pt"))
    assert (t.tag, t.class_index) == ("step00000001", os.path.join(run, "classes.json"))
    # an export written elsewhere finds its run's classes.json through its metadata's source
    from safetensors.torch import save_file

    os.makedirs(tmp_path / "elsewhere")
    exported = str(tmp_path / "elsewhere" / "ft.safetensors")
    save_file({k: v.contiguous() for k, v in sd.items()}, exported, metadata={"source": os.path.join(ck, "step00000002")})
    assert resolve_checkpoint(exported).class_index == os.path.join(run, "classes.json")
    save_file({k: v.contiguous() for k, v in sd.items()}, exported, metadata={"source": "/gone/checkpoints/x"})
    assert resolve_checkpoint(exported).class_index is None
    # a missing or unrecognised --checkpoint is a config error (exit 2, as --resume), not a data error
    with pytest.raises(ConfigError, match=r"^--checkpoint .*nope not found"):
        resolve_checkpoint(str(tmp_path / "nope"))
    os.makedirs(tmp_path / "empty_dir")
    with pytest.raises(ConfigError, match="not a run directory"):
        resolve_checkpoint(str(tmp_path / "empty_dir"))


# ---- end to end: maskfeat finetune writes classes.json; maskfeat eval reads it ----------------------
@pytest.mark.slow
def test_cli_finetune_resume_and_eval_with_a_class_missing_from_val(videos, tmp_path):
    root = str(tmp_path / "data")
    shutil.copytree(videos["root"], root, ignore=shutil.ignore_patterns(".*"))
    env = dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS="1", TRITON_INTERPRET="1")
    out, other = str(tmp_path / "ft"), str(tmp_path / "other")
    common = ["-c", TINY, f"data.root={root}", "data.dataset=folder", "data.num_frames=4", "data.sampling_rate=1",
              "data.crop_size=32", "data.num_clips=1", "data.clips_per_epoch=2", f"data.cache_dir={tmp_path / 'c'}",
              f"train.output_dir={out}", "train.device=cpu", "schedule.epochs=2", "train.checkpoint_every_epochs=1"]

    def engine(*args):
        return subprocess.run([sys.executable, "-m", "engine", *args], cwd=REPO, env=env, capture_output=True,
                              text=True, timeout=300)

    from safetensors.torch import save_file

    from models.variants import create_model

    pretrained = str(tmp_path / "backbone.safetensors")
    save_file(create_model("mvitv2_tiny", "pretrain").state_dict(), pretrained)
    p = engine("finetune", *common, "schedule.max_steps=1", f"finetune.pretrained={pretrained}")
    assert p.returncode == 0 and "pre-trained backbone" in p.stdout, p.stderr[-4000:]
    assert read_class_index(os.path.join(out, "classes.json")) == (["apple", "bunny", "carphone"], 3)
    os.remove(pretrained)  # a resume reads its checkpoint, not the pre-trained file (it needed it, as a start)
    p = engine("finetune", *common, "schedule.max_steps=2", f"finetune.pretrained={pretrained}", "--resume", "auto")
    assert p.returncode == 0 and "resumed from" in p.stdout, p.stderr[-4000:]  # same classes: resumes
    assert "is not read (the checkpoint holds the weights)" in p.stdout
    p = engine("eval", *common, f"train.output_dir={other}", "--checkpoint", os.path.join(out, "checkpoints", "latest"))
    assert p.returncode == 0, p.stderr[-4000:]
    res = json.load(open(os.path.join(out, "eval.json")))
    assert res["videos"] == 2 and res["checkpoint"] == os.path.join(out, "checkpoints", "step00000002")
    assert not os.path.exists(os.path.join(other, "eval.json"))
    # without --config: the run's own config (the defaults' demo dataset and model were evaluated, or refused)
    p = engine("eval", "--checkpoint", out)
    assert p.returncode == 0 and f"no --config: using the config {out} was trained with" in p.stdout, p.stderr[-4000:]
    assert json.load(open(os.path.join(out, "eval.json")))["root"] == root
    clip_tree(root, {"train": {"dog": 1}})  # the train split changed: resuming would relabel the head
    p = engine("finetune", *common, "schedule.max_steps=3", "--resume", "auto")
    assert p.returncode == 5 and "data error: resuming a run whose classes changed" in p.stderr, p.stderr[-3000:]
    assert "new: ['dog']" in p.stderr and "Traceback" not in p.stderr


@pytest.mark.slow
def test_a_run_ending_mid_epoch_keeps_its_final_evaluation_as_best(videos, tmp_path):
    """schedule.max_steps inside an epoch: the final weights are evaluated after the final checkpoint;
    a resumed run takes the best top-1 from the ``best`` tag (it took -inf from the final checkpoint,
    so any score replaced ``best``)."""
    from engine.finetune import saved_best_metric

    env = dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS="1", TRITON_INTERPRET="1")
    out = str(tmp_path / "ft")
    p = subprocess.run([sys.executable, "-m", "engine", "finetune", "-c", TINY, f"data.root={videos['root']}",
                        "data.dataset=folder", "data.num_frames=4", "data.sampling_rate=1", "data.crop_size=32",
                        "data.num_clips=1", "data.clips_per_epoch=4", f"data.cache_dir={tmp_path / 'c'}",
                        f"train.output_dir={out}", "train.device=cpu", "schedule.max_steps=1"],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-4000:]
    assert "finetune.pretrained is empty: the classifier starts from random weights" in p.stdout  # (it was silent)
    evals = [r for r in map(json.loads, open(os.path.join(out, "metrics.jsonl"))) if r["split"] == "val"]
    assert len(evals) == 1  # the one evaluation: of the final weights, mid-epoch
    assert os.path.isdir(os.path.join(out, "checkpoints", "step00000001"))
    assert saved_best_metric(out) == pytest.approx(evals[0]["top1"])  # what a resume starts from
    assert saved_best_metric(str(tmp_path / "nowhere")) == float("-inf")
    damaged = tmp_path / "damaged" / "checkpoints" / "best"
    os.makedirs(damaged)
    (damaged / "engine_state_r00000.pt").write_bytes(b"")  # an EOFError: was a traceback on rank 0 at resume
    assert saved_best_metric(str(tmp_path / "damaged")) == float("-inf")


def test_missing_pretrained_weights_are_a_config_error(tmp_path):
    from engine.finetune import build_classifier

    cfg = load_config(TINY, [f"finetune.pretrained={tmp_path / 'nope.safetensors'}"])
    with pytest.raises(ConfigError, match="finetune.pretrained=.*not found"):
        build_classifier(cfg, 3)


@pytest.mark.slow
def test_image_fine_tuning_counts_the_images_it_trains_on(tmp_path):
    """data.repeated_aug does not apply to images: the global batch and the LR scaling count the
    images a step really sees (they were doubled at the default repeated_aug 2)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for cls in ("a", "b"):
            os.makedirs(tmp_path / "img" / split / cls)
            for j in range(2):
                Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(
                    tmp_path / "img" / split / cls / f"{j}.jpg")
    p = subprocess.run([sys.executable, "-m", "engine", "finetune", "-c", os.path.join(REPO, "configs", "pretrain_vit_b_in1k.yaml"),
                        "model.name=vit_tiny", f"data.root={tmp_path / 'img'}", "data.crop_size=32", "data.batch_size=2",
                        "data.repeated_aug=2", "data.num_threads=1", f"data.cache_dir={tmp_path / 'c'}",
                        "optim.lr_reference_batch=2", f"train.output_dir={tmp_path / 'ft'}", "train.device=cpu",
                        "schedule.max_steps=1", "mask.kind=image_block", "log.tensorboard=false"],
                       cwd=REPO, env=dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS="1", TRITON_INTERPRET="1"),
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "global batch        2" in p.stdout and "x 2/2 = " in p.stdout, p.stdout[-3000:]


@pytest.mark.slow
def test_a_fine_tuning_resumed_with_another_batch_evaluates_its_final_weights(videos, tmp_path):
    """After a step rescale, metrics.jsonl holds the first run's validation at the same step number in
    the old unit: that must not count as the new run's final evaluation (no eval, no best before)."""
    env = dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS="1", TRITON_INTERPRET="1")
    out = str(tmp_path / "ft")
    common = ["finetune", "-c", TINY, f"data.root={videos['root']}", "data.dataset=folder", "data.num_frames=4",
              "data.sampling_rate=1", "data.crop_size=32", "data.num_clips=1", "data.clips_per_epoch=8",
              f"data.cache_dir={tmp_path / 'c'}", f"train.output_dir={out}", "train.device=cpu",
              "schedule.max_steps=0", "train.checkpoint_every_epochs=1"]

    def engine(*args):
        return subprocess.run([sys.executable, "-m", "engine", *common, *args], cwd=REPO, env=env,
                              capture_output=True, text=True, timeout=300)

    p = engine("train.stop_after_steps=5")  # 4 steps per epoch: evaluated and saved at step 4
    assert p.returncode == 3, p.stderr[-3000:]
    p = engine("data.batch_size=4", "--resume", "step00000004")  # 2 steps per epoch: on at step 2, ends at 4
    assert p.returncode == 0 and "final val top-1" in p.stdout, p.stdout[-3000:] + p.stderr[-3000:]
    assert os.path.isdir(os.path.join(out, "checkpoints", "best"))
