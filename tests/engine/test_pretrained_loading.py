"""Loading pre-trained weights into a classifier (``finetune.pretrained``, ``maskfeat eval`` of a
weights file): unreadable files and weights of another model are one-line ConfigErrors (exit 2),
wrapper prefixes are stripped, a head for another number of classes is dropped, and a checkpoint
that leaves backbone tensors random or holds foreign keys is refused unless ``strict=False``.
Tiny models (``mvitv2_tiny``, 8x64x64) and tmp files only."""
from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import save_file

from engine.checkpoint import load_pretrained
from engine.config import ConfigError, load_config
from engine.finetune import build_classifier
from models.checkpoint import (
    load_backbone_into_classifier,
    load_classifier_state,
    strip_known_prefixes,
)
from models.variants import create_model

TINY_YAML = os.path.join(os.path.dirname(__file__), "tiny.yaml")
NEW_KEYS = ["head.projection.bias", "head.projection.weight", "norm.bias", "norm.weight"]


def _tiny(task: str, seed: int = 0, **kw) -> torch.nn.Module:
    torch.manual_seed(seed)
    return create_model("mvitv2_tiny", task, attn_backend="reference", num_frames=8, img_size=64, **kw)


@pytest.fixture(scope="module")
def pt_state() -> dict[str, torch.Tensor]:
    """A tiny pre-training model's state, as our export writes it (no mask_token/pred_head)."""
    sd = _tiny("pretrain", seed=1).state_dict()
    return {k: v for k, v in sd.items() if not k.startswith(("mask_token", "pred_head."))}


def _cfg(pretrained: str):
    return load_config(TINY_YAML, [f"finetune.pretrained={pretrained}"])


def _assert_loaded(clf: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    own = clf.state_dict()
    for k, v in state.items():
        assert torch.equal(own[k], v), k


# ---------------------------------------------------------------------------------------------
# unreadable / unsupported files
# ---------------------------------------------------------------------------------------------
def _random_bytes(path: str) -> None:
    with open(path, "wb") as f:
        f.write(os.urandom(256))


def _truncated_safetensors(path: str) -> None:
    save_file({"a": torch.zeros(64, 64)}, path)
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2])


def _empty(path: str) -> None:
    open(path, "wb").close()


def _list(path: str) -> None:
    torch.save([torch.zeros(2)], path)


def _non_tensor_state(path: str) -> None:
    torch.save({"model_state": {"a": 1}}, path)


def _zero3_states(path: str) -> None:  # what a ZeRO-3 zero_pp_rank_*_model_states.pt holds
    torch.save({"module": {"w": torch.empty(0), "b": torch.empty(0)}, "ds_version": "0.19.8"}, path)


def _bf16_states(path: str) -> None:  # a bf16 run's mp_rank_00_model_states.pt
    torch.save({"module": {"w": torch.zeros(2, 2, dtype=torch.bfloat16)}, "ds_version": "0.19.8"}, path)


@pytest.mark.parametrize("name,write,cause", [
    ("zero_pp_rank_0_mp_rank_00_model_states.pt", _zero3_states, "ZeRO-3 checkpoint: its tensors are one rank's "
                                                                 "empty placeholders; export .*maskfeat export "),
    ("mp_rank_00_model_states.pt", _bf16_states, "module's bfloat16 copy: the fp32 master weights"),
    ("w.pyth", _random_bytes, "cannot be read"),
    ("w.safetensors", _truncated_safetensors, "cannot be read"),
    ("w.pyth", _empty, "empty"),
    ("w.pt", _list, "list, not a state dict"),
    ("w.pyth", _non_tensor_state, "entry 'a' is a int"),
])
def test_bad_pretrained_file_is_a_one_line_config_error(tmp_path, name, write, cause):
    path = str(tmp_path / name)
    write(path)
    with pytest.raises(ValueError, match=cause) as e:
        load_pretrained(path)
    assert path in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(ConfigError, match=cause) as e:
        build_classifier(_cfg(path), 3)
    assert f"finetune.pretrained={path}" in str(e.value) and "\n" not in str(e.value)


def test_a_small_file_asking_for_too_much_memory_is_damaged(tmp_path, monkeypatch):
    """Random bytes unpickle to a MemoryError 1 time in 100 (a length read from garbage), which escaped
    as a traceback (and made the random-bytes case above flaky)."""
    path = str(tmp_path / "w.pyth")
    _random_bytes(path)

    def huge(*a, **k):
        raise MemoryError()

    monkeypatch.setattr(torch, "load", huge)
    with pytest.raises(ValueError, match=r"cannot be read as a torch.save .*MemoryError: it asks for more memory"):
        load_pretrained(path)


def test_weights_of_another_model_size_name_the_embed_dim(tmp_path):
    with torch.device("meta"):
        big = create_model("mvitv2_s_16x4", "pretrain").state_dict()
    path = str(tmp_path / "s16x4.safetensors")
    save_file({k: torch.zeros(v.shape) for k, v in big.items() if not k.startswith(("mask_token", "pred_head."))}, path)
    with pytest.raises(ConfigError) as e:
        build_classifier(_cfg(path), 3)
    msg = str(e.value)
    assert "\n" not in msg and len(msg) < 1000, msg
    assert "model.name=mvitv2_tiny" in msg and "checkpoint embed dim 96, the model expects 32" in msg
    assert "patch_embed.proj.weight" in msg or "blocks.0." in msg


# ---------------------------------------------------------------------------------------------
# successful loads
# ---------------------------------------------------------------------------------------------
def test_export_loads_through_build_classifier(tmp_path, pt_state, capsys):
    path = str(tmp_path / "backbone.safetensors")
    save_file(pt_state, path)
    clf = build_classifier(_cfg(path), 3)
    _assert_loaded(clf, pt_state)
    assert "4 missing" in capsys.readouterr().out


@pytest.mark.parametrize("prefix", ["backbone.", "model.", "module.", "module.backbone."])
def test_wrapper_prefixes_are_stripped(pt_state, prefix):
    clf = _tiny("classify", num_classes=3)
    rep = load_backbone_into_classifier(clf, {"model_state": {prefix + k: v for k, v in pt_state.items()}})
    assert sorted(rep.missing) == NEW_KEYS and rep.unexpected == []
    _assert_loaded(clf, pt_state)


def test_official_pretrain_state_with_hog_buffers_and_pred_head_loads():
    pt = _tiny("pretrain", seed=2)
    sd = dict(pt.state_dict())
    sd["hogs.0.weight_x"] = torch.zeros(3, 1, 3, 3)  # official HOGLayerC keeps its filters as buffers
    sd["hogs.0.gkern"] = torch.zeros(16, 16)
    clf = _tiny("classify", num_classes=3)
    rep = load_backbone_into_classifier(clf, {"epoch": 1, "model_state": sd, "cfg": ""})
    assert sorted(rep.missing) == NEW_KEYS and rep.unexpected == []
    # the 7 pre-training-only tensors are named in the report (they were left out without a word)
    assert len(rep.pretrain_only) == 7 and "left out the pre-training prediction head, mask token, HOG filters (7" in str(rep)


def test_missing_query_pooling_is_allowed_at_the_last_stage_transition_only(pt_state):
    """Pre-training drops the query stride of the last stage transition: a pre-training model
    without it may lack that block's q pooling. Missing at an earlier transition, or at every block
    (another architecture), the tensors would stay random under strict: an error (every transition
    was allowed, so 9 tensors of the first ones could load fresh without a word)."""
    from models.checkpoint import _query_strided_blocks

    clf = _tiny("classify", num_classes=3)
    strided = _query_strided_blocks(clf)
    assert len(strided) >= 2 and strided != set(range(len(clf.blocks)))
    pool_q = [k for k in pt_state if ".attn.pool_q." in k or ".attn.norm_q." in k]
    at_last = [k for k in pool_q if int(k.split(".")[1]) == max(strided)]
    earlier = [k for k in pool_q if int(k.split(".")[1]) in strided - {max(strided)}]
    assert at_last and earlier
    rep = load_backbone_into_classifier(clf, {k: v for k, v in pt_state.items() if k not in at_last})
    assert sorted(rep.missing) == sorted(NEW_KEYS + at_last)
    for lacking in (earlier, pool_q):
        with pytest.raises(ValueError, match=r"missing from the checkpoint .*pool_q"):
            load_backbone_into_classifier(_tiny("classify", num_classes=3),
                                          {k: v for k, v in pt_state.items() if k not in lacking})


def test_head_for_another_number_of_classes_is_dropped_with_a_note(pt_state):
    k400 = _tiny("classify", seed=3, num_classes=5).state_dict()  # "fine-tuned" on 5 classes
    clf = _tiny("classify", num_classes=3)
    head_before = clf.head.projection.weight.clone()
    rep = load_backbone_into_classifier(clf, k400)
    assert rep.dropped == ["head.projection.bias", "head.projection.weight"]
    assert sorted(rep.missing) == ["head.projection.bias", "head.projection.weight"]
    assert "dropped the checkpoint's classification head" in str(rep)
    assert torch.equal(clf.head.projection.weight, head_before)
    _assert_loaded(clf, {k: v for k, v in k400.items() if not k.startswith("head.")})
    # the same number of classes: the head loads
    same = _tiny("classify", seed=4, num_classes=5)
    rep = load_backbone_into_classifier(same, k400)
    assert rep.dropped == [] and rep.missing == []
    _assert_loaded(same, k400)


# ---------------------------------------------------------------------------------------------
# checkpoints that do not fit: refused unless strict=False
# ---------------------------------------------------------------------------------------------
def test_missing_block_is_an_error_unless_not_strict(tmp_path, pt_state):
    partial = {k: v for k, v in pt_state.items() if not k.startswith("blocks.1.")}
    clf = _tiny("classify", num_classes=3)
    before = {k: v.clone() for k, v in clf.state_dict().items()}
    with pytest.raises(ValueError, match=r"missing from the checkpoint.*blocks\.1\.") as e:
        load_backbone_into_classifier(clf, partial)
    assert "\n" not in str(e.value) and "more)" in str(e.value)  # up to 5 keys listed
    for k, v in clf.state_dict().items():  # refused before anything was loaded
        assert torch.equal(v, before[k]), k
    rep = load_backbone_into_classifier(clf, partial, strict=False)
    assert any(k.startswith("blocks.1.") for k in rep.missing)
    path = str(tmp_path / "partial.safetensors")
    save_file(partial, path)
    with pytest.raises(ConfigError, match=r"blocks\.1\."):
        build_classifier(_cfg(path), 3)


def test_unexpected_keys_and_unrelated_checkpoints_are_errors(pt_state):
    clf = _tiny("classify", num_classes=3)
    extra = dict(pt_state, **{"blocks.0.attn.extra": torch.zeros(1)})
    with pytest.raises(ValueError, match=r"1 checkpoint tensors the classifier does not have: blocks\.0\.attn\.extra"):
        load_backbone_into_classifier(clf, extra)
    rep = load_backbone_into_classifier(clf, extra, strict=False)
    assert rep.unexpected == ["blocks.0.attn.extra"]
    with pytest.raises(ValueError, match=r"\(0 of \d+ tensors match\)"):
        load_backbone_into_classifier(clf, {f"encoder.layer{i}.weight": torch.zeros(2) for i in range(8)})


def test_strip_known_prefixes_only_when_it_helps():
    own = ["a.weight", "b.weight"]
    t = torch.zeros(1)
    sd, removed = strip_known_prefixes({"model.a.weight": t, "model.b.weight": t}, own)
    assert sorted(sd) == own and removed == ["model."]
    sd, removed = strip_known_prefixes({"model.c.weight": t}, own)  # stripping matches nothing
    assert list(sd) == ["model.c.weight"] and removed == []
    sd, removed = strip_known_prefixes({"backbone.a.weight": t, "a.weight": t}, own)  # would collide
    assert sorted(sd) == ["a.weight", "backbone.a.weight"] and removed == []
    # ... also where stripping would match more keys: one of the two a.weight would be lost silently
    sd, removed = strip_known_prefixes({"module.a.weight": t, "module.b.weight": t, "a.weight": t}, own)
    assert sorted(sd) == ["a.weight", "module.a.weight", "module.b.weight"] and removed == []


def test_eval_weights_file_checks_fit_in_one_line(tmp_path):
    ft = _tiny("classify", seed=5, num_classes=3).state_dict()
    clf = _tiny("classify", num_classes=3)
    load_classifier_state(clf, {"module." + k: v for k, v in ft.items()})
    _assert_loaded(clf, ft)
    with torch.device("meta"):
        big = create_model("mvitv2_s_16x4", "classify", num_classes=3).state_dict()
    with pytest.raises(ValueError, match="checkpoint embed dim 96, the model expects 32") as e:
        load_classifier_state(clf, {k: torch.zeros(v.shape) for k, v in big.items()})
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match=r"2 classifier tensors missing from the checkpoint .*: norm\.bias, norm\.weight"):
        load_classifier_state(clf, {k: v for k, v in ft.items() if not k.startswith("norm.")})


@pytest.mark.parametrize("container", ["state_dict", "model"])
def test_mmaction_and_mae_containers_are_opened(tmp_path, pt_state, container):
    """{"meta", "state_dict"} (mmaction2) and {"model": ...} (MAE/VideoMAE): the weights inside are
    read (they were refused as "entry 'meta' is a dict, not a tensor" whatever their keys)."""
    path = str(tmp_path / "w.pth")
    torch.save({"meta": {"epoch": 3}, container: dict(pt_state)}, path)
    got = load_pretrained(path)
    assert got.keys() == pt_state.keys()
    torch.save({"meta": {}, container: {"backbone.patch_embed.projection.weight": torch.zeros(1)}}, path)
    with pytest.raises(ConfigError, match=r"does not fit the classifier|do not fit"):
        build_classifier(_cfg(path), 3)  # another model's names: the fit check names them


def test_a_run_folder_as_pretrained_says_to_export_it(tmp_path):
    run = tmp_path / "run"
    os.makedirs(run / "checkpoints")
    with pytest.raises(ValueError, match=r"a folder, not a weights file.*maskfeat export "):
        load_pretrained(str(run))
    with pytest.raises(ConfigError, match=r"a folder, not a weights file.*maskfeat export "):
        build_classifier(_cfg(str(run)), 3)
    # the checkpoints/latest file, which --resume takes: "cannot be read as a torch.save file (12 bytes;
    # UnpicklingError ...); is it truncated?" before
    os.makedirs(run / "checkpoints" / "step00000002")
    latest = run / "checkpoints" / "latest"
    latest.write_text("step00000002")
    with pytest.raises(ValueError, match=r"checkpoints/latest file .*not a weights file.*maskfeat export .*latest\)"):
        load_pretrained(str(latest))
    with pytest.raises(ConfigError, match=r"finetune.pretrained=.*latest: a run's checkpoints/latest file"):
        build_classifier(_cfg(str(latest)), 3)
    from engine.finetune import _check_pretrained

    with pytest.raises(ConfigError, match=r"checkpoints/latest file"):
        _check_pretrained(_cfg(str(latest)))


def test_an_export_under_another_name_loads_as_safetensors(tmp_path, pt_state):
    """The format comes from the file's content: `maskfeat export --out x.st` writes safetensors that
    were read as a torch.save file ("is it truncated, or not a weights file?")."""
    path = str(tmp_path / "backbone.st")
    save_file(pt_state, path)
    got = load_pretrained(path)
    assert got.keys() == pt_state.keys() and all(torch.equal(got[k], pt_state[k]) for k in got)


def test_eval_of_a_ddp_prefixed_official_classifier(tmp_path, monkeypatch):
    """An official fine-tuned .pyth saved from DDP has module.head.projection.weight: eval reads K from
    it (it refused the file as 'not a fine-tuned classifier')."""
    import engine.finetune
    from engine.config import load_config
    from engine.distributed import DistInfo

    ft = _tiny("classify", seed=5, num_classes=3).state_dict()
    path = str(tmp_path / "ft.pyth")
    torch.save({"model_state": {"module." + k: v for k, v in ft.items()}}, path)
    monkeypatch.setattr(engine.finetune, "init_distributed", lambda device="auto": DistInfo(0, 1, 0, torch.device("cpu"), "gloo"))
    class ReachedTheLoader(Exception):
        pass

    def stop(cfg, dist, names):
        raise ReachedTheLoader

    monkeypatch.setattr(engine.finetune, "_eval_loader", stop)
    with pytest.raises(ReachedTheLoader):  # past the head check (K read from module.head...) to the data
        engine.finetune.run_eval(load_config(None, ["model.name=mvitv2_tiny", "train.device=cpu"]), path)
