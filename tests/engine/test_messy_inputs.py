"""engine/data on a messy user collection: a video corrupt in the middle (error / skip with
deterministic replacements), ``data prepare --check --full``, extensions left out, display rotation,
class folders named ``#...``, symlinked and hidden sub-folders, FIFOs, messages for all-bad data,
audio-only files and empty classes, and the probe cache under ``data.cache_dir``.

Videos are tiny (32x16 or 32x32, 24 frames, MJPEG: every frame a key frame, so one corrupt packet
breaks exactly the frames that need it)."""
from __future__ import annotations

import dataclasses
import datetime
import json
import logging
import os
import threading

import av
import numpy as np
import pytest
import torch

from engine.data import BadDatasetError, DataConfig, DataError, build_loader, prepare_main, validate_dataset
from engine.data.datasets import read_list_file, scan_class_folders, write_list_file
from engine.data.errors import VideoDecodeError
from engine.data.pipeline import decode_clip_pyav
from engine.data.probe import decode_all_frames, probe_video, reader_problem, validate_files

N = 24


def write_video(path: str, n: int = N, w: int = 32, h: int = 32, rotate: int | None = None, codec: str = "mjpeg",
                pix_fmt: str = "yuvj420p") -> str:
    """An MJPEG (or ``codec``) .avi/.mp4/.mov: red = 10*i, a green block in the top-left quarter
    (rows < h/2, cols < w/4)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    c = av.open(path, "w")
    s = c.add_stream(codec, rate=24)
    s.width, s.height, s.pix_fmt = w, h, pix_fmt
    if rotate is not None:  # a phone's "rotate=90" tag (turn clockwise to show) reads back as -90 counter-clockwise
        s.set_display_rotation(-rotate)
    for i in range(n):
        a = np.zeros((h, w, 3), np.uint8)
        a[..., 0] = 10 * i
        a[: h // 2, : w // 4, 1] = 255
        for p in s.encode(av.VideoFrame.from_ndarray(a, format="rgb24")):
            c.mux(p)
    for p in s.encode():
        c.mux(p)
    c.close()
    return path


def corrupt_after_first(path: str) -> str:
    """Overwrite every packet but the first with random bytes: the probe (first frame) passes, any
    clip that needs a later frame fails with FFmpeg's InvalidDataError."""
    with av.open(path) as c:
        packets = [(p.pos, p.size) for p in c.demux(c.streams.video[0]) if p.size]
    data = bytearray(open(path, "rb").read())
    rng = np.random.default_rng(0)
    for pos, size in packets[1:]:
        data[pos:pos + size] = rng.integers(0, 256, size, dtype=np.uint8).tobytes()
    open(path, "wb").write(bytes(data))
    return path


def cfg_for(root: str, **kw) -> DataConfig:
    base = dict(root=root, dataset="folder", num_frames=4, sampling_rate=1, target_fps=0, crop_size=16,
                short_side=32, batch_size=2, num_threads=1, prefetch=1, reader="pyav",
                cache_dir=os.path.join(root, ".cache"))
    base.update(kw)
    return DataConfig(**base)


@pytest.fixture(scope="module")
def corrupt_root(tmp_path_factory) -> tuple[str, str]:
    """Two classes, five good videos and one corrupt in the middle; returns (root, bad path)."""
    root = tmp_path_factory.mktemp("corrupt")
    for cls, names in (("a", ("v0", "v1", "v2")), ("b", ("v3", "v4", "bad"))):
        for name in names:
            write_video(str(root / cls / f"{name}.avi"))
    bad = corrupt_after_first(str(root / "b" / "bad.avi"))
    return str(root), bad


# ---- 1: a video corrupt in the middle -------------------------------------------------------------

def test_mid_file_corruption_is_a_data_error_naming_the_file(corrupt_root):
    root, bad = corrupt_root
    loader = build_loader(cfg_for(root), "train")
    assert bad in loader.dataset.paths  # the probe decodes the first frame only: it passes
    with pytest.raises(VideoDecodeError) as e:
        for _ in loader:
            pass
    msg = str(e.value)
    assert isinstance(e.value, DataError) and e.value.path == bad
    assert bad in msg and "InvalidDataError" in msg
    assert "data.on_bad_file=skip" in msg and "--resume auto" in msg and "Remove the file" in msg
    from engine.cli import is_data_error
    assert is_data_error(e.value)  # maskfeat exits 5 with one paragraph


def _batches(loader) -> list[dict]:
    return [{k: v.clone() for k, v in b.items()} for b in loader]


def test_mid_file_corruption_skip_replaces_clips_deterministically(corrupt_root, caplog):
    root, bad = corrupt_root
    cfg = cfg_for(root, on_bad_file="skip", clips_per_epoch=12)
    loader = build_loader(cfg, "train")
    bad_index = loader.dataset.paths.index(bad)
    with caplog.at_level(logging.WARNING, logger="engine.data.loader"):
        ref = _batches(loader)  # epoch 0
        again = _batches(loader)  # epoch 1: the bad file is met again, not warned again
    assert len(ref) == len(again) == len(loader) == 6  # the number of batches never changes
    assert loader.decode_failures == [bad]
    assert sum(bad in r.getMessage() for r in caplog.records) == 1
    planned = [int(i) for b in loader.plan(0) for i in [s.index for s in b]]
    assert planned.count(bad_index) == 2  # the plan drew the bad file twice in epoch 0 ...
    got = torch.cat([b["index"] for b in ref]).tolist()
    valid = torch.cat([b["valid"] for b in ref]).tolist()
    assert bad_index not in got  # ... and each of its clips was replaced by another video's clip
    assert valid.count(False) == 2 and all(i != bad_index for i, ok in zip(got, valid) if not ok)
    # the same epoch from a fresh loader, and resumed mid-epoch, gives the same batches
    fresh = build_loader(cfg, "train")
    for a, b in zip(ref, _batches(fresh)):
        assert torch.equal(a["video"], b["video"]) and torch.equal(a["index"], b["index"])
    resumed = build_loader(cfg, "train")
    resumed.load_state_dict({"epoch": 0, "batches_consumed": 3, "seed": cfg.seed, "world_size": 1})
    for a, b in zip(ref[3:], _batches(resumed)):
        assert torch.equal(a["video"], b["video"]) and torch.equal(a["label"], b["label"])


def test_skip_in_test_mode_marks_replacements_invalid(corrupt_root):
    root, bad = corrupt_root
    loader = build_loader(cfg_for(root, on_bad_file="skip", num_clips=2), "val", mode="test")
    bad_index = loader.dataset.paths.index(bad)
    batches = _batches(loader)
    ids = torch.cat([b["video_id"] for b in batches])
    valid = torch.cat([b["valid"] for b in batches])
    assert len(ids) == 2 * len(loader.dataset) and bad_index not in ids[valid].tolist()
    assert int((~valid).sum()) == 2 and loader.decode_failures == [bad]


def test_mid_file_corruption_in_dalis_cpu_decoder_names_the_file(tmp_path):
    root = tmp_path / "vp9"
    for cls in ("a", "b"):
        for j in range(2):
            path = str(root / cls / f"v{j}.webm")
            os.makedirs(os.path.dirname(path), exist_ok=True)
            c = av.open(path, "w")
            s = c.add_stream("libvpx-vp9", rate=24)
            s.width = s.height = 32
            s.pix_fmt, s.codec_context.gop_size = "yuv420p", 4
            for i in range(12):
                for p in s.encode(av.VideoFrame.from_ndarray(np.full((32, 32, 3), 10 * i, np.uint8), format="rgb24")):
                    c.mux(p)
            for p in s.encode():
                c.mux(p)
            c.close()
    bad = str(root / "b" / "v1.webm")
    with av.open(bad) as c:
        packets = [(p.pos, p.size) for p in c.demux(c.streams.video[0]) if p.size]
    data = bytearray(open(bad, "rb").read())
    for pos, size in packets[1:]:  # the second half of each packet: the container stays readable
        data[pos + size - size // 2:pos + size] = np.random.default_rng(pos).integers(
            0, 256, size // 2, dtype=np.uint8).tobytes()
    open(bad, "wb").write(bytes(data))
    loader = build_loader(cfg_for(str(root), reader="cpu", on_bad_file="skip"), "train")
    assert loader.reader == "cpu" and bad in loader.dataset.paths
    with pytest.raises(VideoDecodeError) as e:
        for _ in loader:
            pass
    assert e.value.path == bad and "data.reader=pyav" in str(e.value) and "--resume auto" in str(e.value)
    assert loader.decode_failures == [bad]


# ---- 2: data prepare --check --full -------------------------------------------------------------

def test_full_check_decodes_every_frame(corrupt_root, capsys):
    root, bad = corrupt_root
    paths = sorted(os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs if f.endswith(".avi"))
    assert not validate_files(paths).bad
    report = validate_files(paths, full=True)
    assert [(b.path, b.reason) for b in report.bad] == [(bad, "decode_error")]
    assert "frame 2 does not decode" in report.bad[0].detail and len(report.good) == 5
    assert prepare_main([root, "--check"]) == 0
    assert "--full decodes every frame" in capsys.readouterr().out
    assert prepare_main([root, "--check", "--full"]) == 1
    out = capsys.readouterr().out
    assert f"bad: {bad}: decode_error" in out


def test_full_check_finds_a_download_cut_short(tmp_path):
    """An MP4 with its index first (faststart), cut short: the probe counts the packets up to the cut
    (the last one cut too), the threaded decoder stops before them without an error, so --check --full
    passed it (and clips past its end repeat its last decoded frame)."""
    path = str(tmp_path / "cut.mp4")
    out = av.open(path, "w", options={"movflags": "faststart"})
    stream = out.add_stream("libx264", rate=30)
    stream.width, stream.height, stream.pix_fmt = 160, 120, "yuv420p"
    rng = np.random.default_rng(0)
    for i in range(120):
        img = rng.integers(0, 256, (120, 160, 3), dtype=np.uint8)  # noise: packets of similar size
        for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
            out.mux(packet)
    for packet in stream.encode():
        out.mux(packet)
    out.close()
    assert not validate_files([path], full=True).bad
    data = open(path, "rb").read()
    open(path, "wb").write(data[: int(len(data) * 0.6)])
    (bad,) = validate_files([path], full=True).bad
    assert bad.reason == "decode_error" and "the last frames do not decode: the stream ends early" in bad.detail, bad
    # an MPEG-4 AVI with dropped frames stored as "not coded" packets (Xvid, VirtualDub) decodes fewer frames
    # than it has packets, and is fine (the reader repeats the frame before): not cut short
    src = write_video(str(tmp_path / "src.avi"), n=20, codec="mpeg4", pix_fmt="yuv420p")
    nvop = str(tmp_path / "nvop.avi")
    with av.open(src) as inp, av.open(nvop, "w") as out:
        sin = inp.streams.video[0]
        sout = out.add_stream_from_template(sin)
        k = 0
        for packet in (p for p in inp.demux(sin) if p.size):
            for data in ([packet] + ([av.Packet(b"\x00\x00\x01\xb6\x50\x4f")] if k in (5, 10) else [])):
                data.stream, data.pts, data.dts, data.time_base = sout, k, k, sout.time_base
                out.mux(data)
                k += 1
    assert probe_video(nvop).info.num_frames == 22 and decode_all_frames(nvop)[0] == 20
    assert not validate_files([nvop], full=True).bad


# ---- 3: extensions left out ---------------------------------------------------------------------

def test_other_video_extensions_are_counted_and_prepare_takes_extensions(tmp_path, caplog, capsys):
    root = tmp_path / "src"
    write_video(str(root / "a" / "x.mp4"))
    for name in ("cam.MTS", "cam2.mts", "phone.3gp", "old.mpg"):
        write_video(str(tmp_path / "tmp.avi"))
        os.makedirs(root / "a", exist_ok=True)
        os.replace(tmp_path / "tmp.avi", root / "a" / name)
    (root / "a" / "notes.txt").write_text("not a video")
    with caplog.at_level(logging.WARNING, logger="engine.data.datasets"):
        ds = scan_class_folders(str(root), (".mp4",))
    assert [os.path.basename(p) for p in ds.paths] == ["x.mp4"]
    assert ds.left_out == {".MTS": 1, ".mts": 1, ".3gp": 1, ".mpg": 1}
    msg = [r.getMessage() for r in caplog.records if "left out for their extension" in r.getMessage()]
    assert len(msg) == 1 and ".3gp 1" in msg[0] and "data.extensions" in msg[0] and "--extensions" in msg[0]
    assert prepare_main([str(root), "--check", "--extensions", "mp4,.MTS"]) == 0
    assert "3 files: 3 good" in capsys.readouterr().out  # x.mp4, cam.MTS, cam2.mts
    assert prepare_main([str(root), "--check"]) == 0  # the default takes every video extension
    assert "5 files: 5 good" in capsys.readouterr().out


# ---- 4: display rotation ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def rotated(tmp_path_factory) -> str:
    """32 wide x 16 tall as stored, tagged rotate=90 (turn clockwise to show: 16 wide x 32 tall)."""
    return write_video(str(tmp_path_factory.mktemp("rot") / "c" / "phone.mov"), w=32, h=16, rotate=90)


def test_rotation_is_probed_and_applied_when_decoding(rotated):
    info = probe_video(rotated).info
    assert info.rotation == 270 and (info.width, info.height) == (32, 16)
    assert (info.displayed().width, info.displayed().height) == (16, 32)
    clip = decode_clip_pyav(rotated, np.array([0, 5]), 32, info.rotation)
    assert clip.shape == (2, 32, 16, 3)
    # the green block (stored top-left, 8 wide x 8 tall) shows top-right after a clockwise turn
    green = clip[0, ..., 1] > 128
    assert green[:8, 8:].mean() > 0.9 and green[:, :8].mean() < 0.1 and green[8:].mean() < 0.1
    for reader in ("cpu", "gpu"):
        info_vp9 = type(info)(**{**info.__dict__, "codec": "vp9", "width": 320, "height": 160, "pix_fmt": "yuv420p"})
        assert reader_problem(info_vp9, reader, 1)[0] == "rotated"
    assert reader_problem(info, "pyav", 1) is None


def test_gpu_reader_takes_8_bit_420_only(tmp_path, monkeypatch):
    """H.264 High 10, 4:2:2 and 4:4:4 passed every check of the GPU reader (codec, size, rate,
    rotation), so ``reader=auto`` gave them to NVDEC, which does not decode them on GPUs before
    Blackwell: the run would fail inside DALI, where ``on_bad_file=skip`` cannot replace a file."""
    import engine.data.pipeline as pipeline
    from engine.data.loader import choose_reader

    infos = {}
    for pix in ("yuv420p", "yuv420p10le", "yuv422p", "yuv444p"):
        path = write_video(str(tmp_path / f"{pix}.mp4"), n=4, w=160, h=128, codec="libx264", pix_fmt=pix)
        infos[pix] = probe_video(path).info
        assert infos[pix].pix_fmt == pix
        problem = reader_problem(infos[pix], "gpu", 1)
        assert (problem is None) == (pix == "yuv420p"), (pix, problem)
        if problem:
            assert problem[0] == "pix_fmt" and "reader=pyav" in problem[1]
        assert reader_problem(infos[pix], "pyav", 1) is None
    monkeypatch.setattr(pipeline, "cuda_dali_usable", lambda: True)
    cuda = torch.device("cuda", 0)
    assert choose_reader("auto", [infos["yuv420p"]], cuda) == "gpu"
    assert choose_reader("auto", list(infos.values()), cuda) == "pyav"


def test_loader_plans_on_displayed_sizes(rotated):
    loader = build_loader(cfg_for(os.path.dirname(os.path.dirname(rotated)), num_clips=1, batch_size=1), "val", mode="test")
    (spec,), = list(loader.plan(0))
    # 1 crop: the centre square of 0.875 x the short side (16 displayed wide) on a 16 x 32 frame
    y0, x0, y1, x1 = spec.roi
    assert (x1 - x0) * 16 == pytest.approx(14) and (y1 - y0) * 32 == pytest.approx(14)
    assert next(iter(loader))["video"].shape == (1, 3, 4, 16, 16)


def test_prepare_writes_rotated_videos_upright(rotated, tmp_path):
    from engine.data.prepare import encode_video

    out = str(tmp_path / "up.webm")
    encode_video(rotated, out, codec="vp9", short_side=32)
    info = probe_video(out).info
    assert (info.width, info.height, info.rotation, info.num_frames) == (16, 32, 0, N)
    frame = decode_clip_pyav(out, np.array([0]), 32)[0]
    green = frame[..., 1] > 128
    assert green[:8, 8:].mean() > 0.8 and green[8:].mean() < 0.1


def test_a_display_matrix_that_is_no_rotation_reads_as_none(tmp_path):
    """An MP4 whose track matrix is all zeros (or has a zero scale) has no rotation; FFmpeg's angle is
    NaN and PyAV's ``frame.rotation`` INT_MIN, which read as 270: such a file was turned sideways."""
    import struct
    from types import SimpleNamespace

    from engine.data.probe import frame_rotation

    assert [frame_rotation(SimpleNamespace(rotation=r)) for r in (-90, 90, -180, 0, None, -2147483648)] == \
        [270, 90, 180, 0, 0, 0]
    path = write_video(str(tmp_path / "m.mp4"), codec="mpeg4", pix_fmt="yuv420p")
    data = bytearray(open(path, "rb").read())
    at = data.index(b"tkhd") + 4  # version 0: flags, times, track id, reserved, duration, reserved, layer ... volume
    struct.pack_into(">9i", data, at + 4 + 20 + 8 + 8, *(0,) * 9)  # the 3x3 matrix
    open(path, "wb").write(bytes(data))
    with av.open(path) as c:
        assert next(c.decode(video=0)).rotation == -2147483648  # (the patch hit the matrix)
    assert probe_video(path).info.rotation == 0


@pytest.mark.parametrize("rotate", [90, 180, 270])
def test_every_rotation_is_shown_upright_by_the_reader_and_by_prepare(rotate, tmp_path):
    """90 only was checked: ignoring 180 (or turning 270 the wrong way) in the reader or in
    `data prepare` passed. The stored 32x16 frame's green block (top-left 8x8) must show where the
    turned picture has it: 90 clockwise top-right, 180 bottom-right, 270 bottom-left."""
    from engine.data.prepare import encode_video

    src = write_video(str(tmp_path / "c" / f"r{rotate}.mov"), w=32, h=16, rotate=rotate)
    shown = (16, 32) if rotate % 180 else (32, 16)  # displayed (width, height)
    rows, cols = {90: (slice(0, 8), slice(8, 16)), 180: (slice(8, 16), slice(24, 32)),
                  270: (slice(24, 32), slice(0, 8))}[rotate]
    info = probe_video(src).info
    out = str(tmp_path / f"up{rotate}.webm")
    encode_video(src, out, codec="vp9", short_side=32)
    up = probe_video(out).info
    assert (up.width, up.height, up.rotation) == (*shown, 0)
    for frame in (decode_clip_pyav(src, np.array([0]), 32, info.rotation)[0], decode_clip_pyav(out, np.array([0]), 32)[0]):
        assert frame.shape[:2] == shown[::-1]
        green = frame[..., 1] > 128
        assert green[rows, cols].mean() > 0.8 and green.mean() < 0.2, rotate


# ---- 5: class folders named '#...' ---------------------------------------------------------------

def test_hash_class_folder_round_trips_through_lists(tmp_path, caplog):
    root = tmp_path / "src"
    for cls in ("#tag", "plain"):
        write_video(str(root / cls / "v.avi"), n=6)
    write_list_file(str(root / "train.csv"), [("#tag/v.avi", 0), ("plain/v.avi", 1)])
    assert (root / "train.csv").read_text().startswith("./#tag/v.avi 0\n")
    ds = read_list_file(str(root / "train.csv"), str(root))
    assert [os.path.relpath(p, root) for p in ds.paths] == ["#tag/v.avi", "plain/v.avi"] and ds.labels == [0, 1]
    # a hand-written '#tag/...' line stays a comment, with a warning that it names a file
    (root / "train.csv").write_text("#tag/v.avi 0\nplain/v.avi 1\n")
    with caplog.at_level(logging.WARNING, logger="engine.data.datasets"):
        assert len(read_list_file(str(root / "train.csv"), str(root))) == 1
    assert any("./#name" in r.getMessage() for r in caplog.records)


def test_list_paths_spelt_otherwise_and_empty_lists_say_so(tmp_path):
    """A list naming 'café/v.avi' in NFC for a folder copied from macOS (NFD), or with Windows
    separators, reported the files as 'missing (no such file)' with no hint; a list with no entries
    said 'every file is bad ()'."""
    import unicodedata

    nfd = unicodedata.normalize("NFD", "café")
    write_video(str(tmp_path / nfd / "v.avi"), n=6)
    write_video(str(tmp_path / "plain" / "w.avi"), n=6)
    (tmp_path / "train.csv").write_text(f"{unicodedata.normalize('NFC', 'café')}/v.avi 0\nplain\\w.avi 1\n",
                                        encoding="utf-8")
    with pytest.raises(BadDatasetError) as e:
        validate_dataset(cfg_for(str(tmp_path), dataset="kinetics"), "train")
    text = str(e.value)
    assert "its Unicode NFD spelling exists" in text and "with / for \\ it exists" in text
    for body in ("", "path label\n", "# nothing yet\n"):
        (tmp_path / "train.csv").write_text(body)
        with pytest.raises(BadDatasetError, match="the listing is empty"):
            validate_dataset(cfg_for(str(tmp_path), dataset="kinetics"), "train")
    # the list writer writes UTF-8 whatever the locale (the reader requires it)
    write_list_file(str(tmp_path / "w.csv"), [(f"{nfd}/v.avi", 0)])
    assert (tmp_path / "w.csv").read_bytes() == f"{nfd}/v.avi 0\n".encode("utf-8")


def test_prepare_keeps_hash_class_videos(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    for cls in ("#tag", "plain"):
        write_video(str(src / cls / "v.avi"), n=6)
    assert prepare_main([str(src), str(dst), "--short-side", "16", "--workers", "1"]) == 0
    ds = read_list_file(str(dst / "train.csv"), str(dst))
    assert ds.class_names == ["#tag", "plain"] and sorted(ds.labels) == [0, 1]


# ---- 6: symlinked and hidden sub-folders ------------------------------------------------------

def test_symlinked_subfolders_followed_once_hidden_ones_pruned(tmp_path):
    root, elsewhere = tmp_path / "root", tmp_path / "elsewhere"
    write_video(str(root / "a" / "v.avi"), n=2)
    write_video(str(elsewhere / "w.avi"), n=2)
    os.symlink(elsewhere, root / "a" / "linked")
    os.symlink(elsewhere, root / "a" / "linked_again")  # the same real folder: walked once
    os.symlink(root / "a", root / "a" / "loop")  # a loop: not followed
    write_video(str(root / "a" / ".AppleDouble" / "x.avi"), n=2)
    ds = scan_class_folders(str(root), (".avi",))
    assert [os.path.relpath(p, root) for p in ds.paths] == ["a/v.avi", "a/linked/w.avi"]


# ---- 7: a FIFO named *.mp4 -----------------------------------------------------------------------

def test_fifo_is_reported_without_opening_it(tmp_path):
    fifo = str(tmp_path / "pipe.mp4")
    os.mkfifo(fifo)
    done: dict = {}
    t = threading.Thread(target=lambda: done.update(r=probe_video(fifo)), daemon=True)
    t.start()
    t.join(20)
    if t.is_alive():  # the open blocks until a writer comes: unblock it so the test ends
        with open(fifo, "wb"):
            pass
        t.join(5)
        pytest.fail("probe_video opened the FIFO (it blocked)")
    assert done["r"].reason == "unreadable" and "FIFO" in done["r"].detail


# ---- 8: messages ---------------------------------------------------------------------------------

def test_all_bad_with_skip_does_not_say_set_skip(tmp_path):
    root = tmp_path / "allbad"
    os.makedirs(root / "a")
    (root / "a" / "x.mp4").write_text("not a video")
    with pytest.raises(BadDatasetError) as e:
        validate_dataset(cfg_for(str(root), on_bad_file="skip"), "val")
    assert "set data.on_bad_file=skip" not in str(e.value) and "no usable file" in str(e.value)
    assert "train" not in str(e.value).splitlines()[-1]
    write_video(str(root / "a" / "ok.avi"), n=6)
    with pytest.raises(BadDatasetError) as e:
        validate_dataset(cfg_for(str(root)), "val")
    assert str(e.value).splitlines()[-1] == "(set data.on_bad_file=skip to leave them out and go on with the others)"


def _write_audio(path: str, cover_art: bool = False) -> str:
    """An AAC .mp4 of 5 silent frames; with ``cover_art`` an MJPEG picture stream flagged as attached."""
    c = av.open(path, "w")
    audio = c.add_stream("aac", rate=44100)
    if cover_art:
        art = c.add_stream("mjpeg")
        art.width, art.height, art.pix_fmt = 32, 32, "yuvj420p"
        art.disposition = av.stream.Disposition.attached_pic
        img = av.VideoFrame.from_ndarray(np.full((32, 32, 3), 128, np.uint8), format="rgb24")
        for p in [*art.encode(img.reformat(format="yuvj420p")), *art.encode()]:
            c.mux(p)
    for i in range(5):
        f = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
        f.sample_rate, f.pts = 44100, i * 1024
        for p in audio.encode(f):
            c.mux(p)
    for p in audio.encode():
        c.mux(p)
    c.close()
    return path


def test_prepare_reports_audio_only_and_empty_classes(tmp_path, capsys):
    src = tmp_path / "src"
    write_video(str(src / "a" / "v.avi"), n=6)
    os.makedirs(src / "empty")
    _write_audio(str(src / "a" / "sound.mp4"))
    assert prepare_main([str(src), "--check"]) == 1
    err = capsys.readouterr().err
    assert "1 class(es) without video files: empty" in err
    assert prepare_main([str(src), str(tmp_path / "dst"), "--short-side", "16", "--workers", "1"]) == 1
    err = capsys.readouterr().err
    assert f"failed: {src / 'a' / 'sound.mp4'}: no video stream (only audio)" in err
    assert "IndexError" not in err and "without video files: empty" in err


def test_an_audio_file_with_cover_art_is_not_a_video(tmp_path, capsys):
    """FFmpeg lists an audio file's cover art as a video stream: the probe reported it as a corrupt
    video ("first frame does not decode: Operation not permitted"), and prepare wrote it as one."""
    src = tmp_path / "src"
    write_video(str(src / "a" / "v.avi"), n=6)
    path = _write_audio(str(src / "a" / "song.mp4"), cover_art=True)
    res = probe_video(path)
    assert (res.reason, res.detail) == ("not_video", "its first video stream is cover art (an attached picture, as "
                                                     "audio files have)")
    assert prepare_main([str(src), str(tmp_path / "dst"), "--short-side", "16", "--workers", "1"]) == 1
    assert f"failed: {path}: its first video stream is cover art" in capsys.readouterr().err


# ---- 9: probe cache location, skipped files -------------------------------------------------------

def test_probe_cache_lives_in_cache_dir_and_reads_the_old_one(tmp_path):
    root, cache_dir = tmp_path / "data", tmp_path / "cache"
    write_video(str(root / "a" / "v.avi"), n=6)
    (root / "a" / "bad.mp4").write_text("nope")
    cfg = cfg_for(str(root), cache_dir=str(cache_dir), on_bad_file="skip")
    check = validate_dataset(cfg, "val")
    assert not (root / ".maskfeat_probe.json").exists()
    (cache,) = os.listdir(cache_dir)
    assert check.report.probed == 2
    # an older cache in the root is still read
    os.replace(cache_dir / cache, root / ".maskfeat_probe.json")
    assert validate_dataset(cfg, "val").report.cached == 2
    loader = build_loader(cfg, "val", mode="test")
    assert loader.report.records() == [{"path": str(root / "a" / "bad.mp4"), "reason": "not_video",
                                     "detail": loader.report.bad[0].detail}]
    json.dumps(loader.report.records())


# ---- short videos in evaluation; agreement of ranks on the bad files ------------------------------
@pytest.mark.parametrize("reader", ["pyav", "cpu"])
def test_a_video_shorter_than_a_clip_is_evaluated_and_trained_on_with_its_last_frame_repeated(tmp_path, reader,
                                                                                               caplog):
    """SlowFast evaluates and trains on a video shorter than one clip with its last frame repeated
    (its decoder clamps the indices; Kinetics val has such videos); ``data.short_videos=bad`` leaves
    it out of training as too_short (data.on_bad_file decides how)."""
    root = tmp_path / "short"
    for split in ("train", "val"):
        for cls in ("a", "b"):
            write_video(str(root / split / cls / "long.avi"))
        short = write_video(str(root / split / "b" / "short.avi"), n=3)
    cfg = cfg_for(str(root), num_frames=8, sampling_rate=1, num_clips=2, num_crops=1, reader=reader)
    with pytest.raises(BadDatasetError, match="short.avi.*too_short"):
        validate_dataset(dataclasses.replace(cfg, short_videos="bad"), "train")
    trained = validate_dataset(dataclasses.replace(cfg, short_videos="bad", on_bad_file="skip"), "train")
    assert len(trained.dataset.paths) == 2 and "short.avi" not in str(trained.dataset.paths)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="engine.data.loader"):
        check = validate_dataset(cfg, "train")
    assert str(root / "train" / "b" / "short.avi") in check.dataset.paths and not check.report.bad
    assert (f"1 of 3 train files are shorter than one clip (first: {root / 'train' / 'b' / 'short.avi'}, 3 frames, "
            "a clip spans 8)") in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="engine.data.loader"):
        check = validate_dataset(cfg, "val", mode="test")
    assert short in check.dataset.paths and not check.report.bad and "shorter than one clip" not in caplog.text

    def clips_of_short(loader, key: str) -> list[torch.Tensor]:
        seen = []
        for batch in loader:
            for i, v in enumerate(batch[key].tolist()):
                if os.path.basename(loader.dataset.paths[v]) == "short.avi" and batch["valid"][i]:
                    seen.append(batch["video"][i])
        return seen

    loader = build_loader(cfg, "val", mode="test")
    assert loader.reader == reader
    clips = clips_of_short(loader, "video_id")
    assert len(clips) == 2  # both temporal views, each 8 frames from a 3-frame file
    train = build_loader(cfg, "train", mode="pretrain")
    assert train.reader == reader
    clips += clips_of_short(train, "index")
    assert len(clips) == 3  # one training clip per video and epoch
    for c in clips:  # frames 0, 1, 2, then the last one, 2, repeated (red level 10·i: rising, not wrapped to 0)
        assert all(torch.equal(c[:, t], c[:, 2]) for t in range(3, 8))
        red = c[0].mean(dim=(1, 2))
        assert red[0] < red[1] < red[2], red


def _agree_worker(rank: int, init: str, bad: dict, out: str) -> None:
    from engine.data.loader import agree_across_ranks
    from engine.data.probe import BadFile

    torch.distributed.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    try:
        got = agree_across_ranks([BadFile(p, "unreadable", f"seen by {rank}") for p in bad[rank]])
        with open(f"{out}.{rank}", "w") as f:
            json.dump([[b.path, b.detail] for b in got], f)
    finally:
        torch.distributed.destroy_process_group()


def test_ranks_agree_on_the_bad_files(tmp_path):
    """A file only rank 1 cannot read is left out on rank 0 too (or stops both under ``error``):
    every rank keeps the same dataset, so shards, epoch lengths and collectives stay in step."""
    import torch.multiprocessing as mp

    out = str(tmp_path / "agree")
    bad = {0: ["x.mp4"], 1: ["y.mp4", "x.mp4"]}
    mp.spawn(_agree_worker, args=(f"file://{tmp_path / 'store'}", bad, out), nprocs=2, join=True)
    r0, r1 = (json.load(open(f"{out}.{r}")) for r in (0, 1))
    assert r0 == [["x.mp4", "seen by 0"], ["y.mp4", "seen by 1 (on rank 1)"]]
    assert r1 == [["y.mp4", "seen by 1"], ["x.mp4", "seen by 1"]]  # the same set (order does not matter)


def _listing_worker(rank: int, init: str, listings: dict, out: str) -> None:
    from engine.data.datasets import Dataset
    from engine.data.errors import DataError
    from engine.data.loader import check_same_listing

    torch.distributed.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    try:
        root, paths, labels, classes = listings[rank]
        try:
            check_same_listing(Dataset(paths, labels, classes), "train", root)
            res = "same"
        except DataError as e:
            res = str(e)
        with open(f"{out}.{rank}", "w") as f:
            f.write(res)
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.parametrize("case", ["same", "same under another mount", "a file missing on one node",
                                  "a class missing on one node", "another label"])
def test_ranks_must_list_the_same_files(tmp_path, case):
    """A file missing from one node's copy was never a bad file there: the ranks ran with different
    datasets (another video at an index, overlapping shards, another epoch length). Now every rank
    stops with a data error naming each rank's counts; the same files under another root are the
    same dataset."""
    import torch.multiprocessing as mp

    full = ("/d", ["/d/a.mp4", "/d/b.mp4", "/d/c.mp4"], [0, 1, 1], ["x", "y"])
    other = {"same": full, "same under another mount": ("/e", ["/e/a.mp4", "/e/b.mp4", "/e/c.mp4"], [0, 1, 1], ["x", "y"]),
             "a file missing on one node": ("/d", full[1][:2], [0, 1], full[3]),
             "a class missing on one node": ("/d", full[1], full[2], ["x"]),
             "another label": ("/d", full[1], [0, 1, 0], full[3])}[case]
    out = str(tmp_path / "listing")
    mp.spawn(_listing_worker, args=(f"file://{tmp_path / 'store'}", {0: full, 1: other}, out), nprocs=2, join=True)
    r0, r1 = (open(f"{out}.{r}").read() for r in (0, 1))
    assert r0 == r1
    if case.startswith("same"):
        assert r0 == "same"
    else:
        assert r0.startswith("the ranks list different train files or classes (rank 0: 3 files, 2 classes; rank 1:")


def test_both_loaders_compare_their_listing_across_ranks(tmp_path, monkeypatch):
    """The video and the image loader call check_same_listing (every rank does, before validating)."""
    from PIL import Image

    import engine.data.loader as L
    from engine.data import DataConfig, build_loader

    seen = []
    real = L.check_same_listing
    monkeypatch.setattr(L, "check_same_listing", lambda ds, split, root: (seen.append((split, root)),
                                                                           real(ds, split, root))[1])
    build_loader(DataConfig(num_frames=4, crop_size=32, batch_size=2, clips_per_epoch=2, num_threads=1,
                            cache_dir=str(tmp_path / "c")), "train")
    for cls in ("a", "b"):
        os.makedirs(tmp_path / "img" / "train" / cls)
        Image.new("RGB", (40, 30)).save(tmp_path / "img" / "train" / cls / "0.jpg")
    build_loader(DataConfig(root=str(tmp_path / "img"), dataset="image_folder", crop_size=16, batch_size=2,
                            num_threads=1, cache_dir=str(tmp_path / "c")), "train")
    assert [s for s, _ in seen] == ["train", "train"] and seen[1][1] == str(tmp_path / "img")


def test_validation_applies_the_agreed_bad_files(corrupt_root):
    """validate_dataset drops (skip) or reports (error) a file another rank found bad."""
    from engine.data.probe import BadFile

    root, _ = corrupt_root
    other = os.path.join(root, "a", "v1.avi")

    def agree(bad):
        return bad + [BadFile(other, "unreadable", "Errno 5 (on rank 1)")]

    check = validate_dataset(cfg_for(root, on_bad_file="skip"), "train", agree=agree)
    assert other not in check.dataset.paths and len(check.dataset) == 5
    with pytest.raises(BadDatasetError, match=r"v1.avi.*on rank 1"):
        validate_dataset(cfg_for(root), "train", agree=agree)


def test_a_failing_final_evaluation_keeps_the_final_checkpoint_and_is_redone(tmp_path):
    """A fine-tuning run that ends mid-epoch evaluates after its final checkpoint: a val file corrupt
    past its first frame stops the run (exit 5) without losing the training steps, and a resume
    once the file is repaired evaluates the final weights (once). A run continued from that
    checkpoint in another folder keeps its own best."""
    import subprocess
    import sys

    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    root = tmp_path / "data"
    for split in ("train", "val"):
        for cls in ("a", "b"):
            write_video(str(root / split / cls / "v.avi"))
    corrupt_after_first(str(root / "val" / "b" / "v.avi"))
    out = tmp_path / "run"

    def finetune(*extra):
        return subprocess.run([sys.executable, "-m", "engine", "finetune", "-c",
                               os.path.join(repo, "tests", "engine", "tiny.yaml"), f"data.root={root}",
                               "data.dataset=folder", "data.num_frames=4", "data.sampling_rate=1", "data.target_fps=0",
                               "data.crop_size=32", "data.num_clips=1", "data.clips_per_epoch=4", "data.reader=pyav",
                               f"data.cache_dir={tmp_path / 'c'}", "train.device=cpu", "schedule.max_steps=1", *extra],
                              cwd=repo, env=dict(os.environ, PYTHONPATH=repo, OMP_NUM_THREADS="1", TRITON_INTERPRET="1"),
                              capture_output=True, text=True, timeout=300)

    p = finetune(f"train.output_dir={out}")
    assert p.returncode == 5 and "v.avi" in p.stderr and "Traceback" not in p.stderr, p.stderr[-3000:]
    assert os.path.isdir(out / "checkpoints" / "step00000001")
    write_video(str(root / "val" / "b" / "v.avi"))  # the file repaired: the resume evaluates what it missed
    p = finetune(f"train.output_dir={out}", "--resume", "auto")
    assert p.returncode == 0 and "already complete at step 1" in p.stdout and "final val top-1" in p.stdout, p.stderr[-3000:]
    assert os.path.isdir(out / "checkpoints" / "best")
    p = finetune(f"train.output_dir={out}", "--resume", "auto")  # evaluated now: nothing left to do
    assert p.returncode == 0 and "final val top-1" not in p.stdout, p.stdout[-2000:]
    # continued from this run's checkpoint in another folder: that run's best is not here, so it starts its own
    other = tmp_path / "other"
    p = finetune(f"train.output_dir={other}", "schedule.max_steps=2", "--resume", str(out / "checkpoints" / "step00000001"))
    assert p.returncode == 0 and os.path.isdir(other / "checkpoints" / "best"), p.stderr[-3000:]
    # ending on an epoch's last step (2 steps of 2 clips), with an evaluation every epoch: the epoch's
    # evaluation is the final one, after the final checkpoint (before it, a failure lost the steps)
    corrupt_after_first(str(root / "val" / "b" / "v.avi"))
    edge = tmp_path / "edge"
    p = finetune(f"train.output_dir={edge}", "schedule.max_steps=2", "train.eval_every_epochs=1")
    assert p.returncode == 5 and os.path.isdir(edge / "checkpoints" / "step00000002"), p.stderr[-3000:]


def _numbered_video(path: str, n: int, pts_ms=None, last_duration_s: float = 0.0, gop: int = 0, first: int = 0,
                    codec: str = "libx264") -> str:
    """An H.264 (or ``codec``) clip of ``n`` frames, frame i marked by a bar 2(first + i) + 1 pixels
    wide (up to 79); presentation times ``pts_ms`` (default 30 fps), the last packet lasting
    ``last_duration_s`` when given (a file whose average rate, frames over duration, is not its frame
    spacing), a key frame every ``gop`` frames when given (x264's default is 250: every seek lands on
    frame 0)."""
    from fractions import Fraction

    out = av.open(path, "w")
    stream = out.add_stream(codec, rate=30)
    stream.width, stream.height, stream.pix_fmt = 160, 32, "yuv420p"
    stream.codec_context.time_base = Fraction(1, 1000)
    if codec == "libx264":
        stream.options = {"bf": "0"} if not gop else {"bf": "0", "g": str(gop), "keyint_min": str(gop)}
    elif gop:
        stream.codec_context.gop_size = gop
    packets = []
    for i in range(n):
        img = np.zeros((32, 160, 3), np.uint8)
        img[:, : 2 * (first + i) + 1, 1] = 255
        frame = av.VideoFrame.from_ndarray(img, format="rgb24")
        frame.pts, frame.time_base = (round(i * 1000 / 30) if pts_ms is None else pts_ms[i]), Fraction(1, 1000)
        packets += stream.encode(frame)
    packets += stream.encode()
    for k, packet in enumerate(packets):
        if last_duration_s and k == len(packets) - 1:
            packet.duration = int(last_duration_s / packet.time_base)
        out.mux(packet)
    out.close()
    return path


def _frame_numbers(clip: np.ndarray) -> list[int]:
    return [int(((f[16, :, 1] > 128).sum() - 1) // 2) for f in clip]


def _timeline(path: str):
    return probe_video(path).info.timeline


def _step_ms(path: str) -> float:
    with av.open(path) as c:
        return _timeline(path)[1] * float(c.streams.video[0].time_base) * 1000


def test_pyav_decodes_the_planned_frames_of_irregular_timelines(tmp_path):
    """The sampler's frame indices are positions in the stream. A seek that read frame numbers from
    presentation times at the average rate gave other frames: a 1 s freeze (variable frame rate)
    decoded [1, 5, 9, 13] as [1, 7, 13, 19], a long last frame (average rate 12.6 for 30 fps frames)
    [7, …, 22] as [13, 15, …, 43], and one dropped frame before the key frame a seek lands on
    [21, 25, 29, 33] as [20, 24, 28, 32]. Now a seek numbers frames from the probe's first time and
    mean spacing, and only for files whose times are evenly spaced with no gap; the others are
    decoded counting frames. Key frames every 10 frames, so seeks land past the irregularity."""
    vfr = _numbered_video(str(tmp_path / "vfr.mp4"), 60, gop=10,
                          pts_ms=[round(i * 1000 / 30) + (1000 if i >= 20 else 0) for i in range(60)])
    long_last = _numbered_video(str(tmp_path / "long_last.mp4"), 50, last_duration_s=2.0, gop=10)
    dropped = _numbered_video(str(tmp_path / "dropped.mkv"), 60, gop=10,
                              pts_ms=[round((i + (i >= 10)) * 1000 / 30) for i in range(60)])
    ntsc = _numbered_video(str(tmp_path / "ntsc.mp4"), 80, gop=10,  # 29.97 fps in ms: steps of 33 and 34
                           pts_ms=[round(i * 1001 / 30) for i in range(80)])
    assert not probe_video(vfr).info.cfr
    with av.open(long_last) as c:  # the container's average rate is 12.6; the frames are 30 fps apart
        assert c.streams.video[0].average_rate < 20
    assert probe_video(long_last).info.fps == pytest.approx(30, rel=0.01)  # a variable rate's: from its times
    assert _timeline(vfr) is None and _timeline(dropped) is None  # decoded counting frames
    assert _step_ms(long_last) == pytest.approx(1000 / 30, abs=0.01)  # packet times: even, whatever the rate
    assert _step_ms(ntsc) == pytest.approx(1001 / 30, abs=0.01)  # the mean step, not the median (33 ms)
    cases = ((vfr, (0, 1, 10, 30, 40)), (long_last, (0, 7, 21, 33)), (dropped, (0, 21, 28, 40)), (ntsc, (0, 31, 63)))
    for path, starts in cases:
        for start in starts:
            frames = np.arange(start, start + 16, 4)
            got = decode_clip_pyav(path, frames, 1000, timeline=_timeline(path))
            assert _frame_numbers(got) == frames.tolist(), (path, start)
    from engine.data.pipeline import _decode_pass

    # evenly spaced files keep the seek (no decoding from the start): the pass with the timeline
    # returns the frames instead of None, and lands past frame 0 (it never decodes frames 0-59)
    for path, frames in ((ntsc, [63, 67, 71, 75]), (long_last, [33, 37, 41, 45])):
        got = _decode_pass(path, set(frames), frames[0], 1000, _timeline(path))
        assert got is not None and sorted(got) == frames, path
        assert _frame_numbers(np.stack([got[f] for f in frames])) == frames
    regular = _numbered_video(str(tmp_path / "regular.mp4"), 50)
    frames = np.array([33, 35, 40, 49])
    assert _frame_numbers(decode_clip_pyav(regular, frames, 1000, timeline=_timeline(regular))) == frames.tolist()
    assert _frame_numbers(decode_clip_pyav(regular, frames, 1000)) == frames.tolist()  # no timeline: counted


@pytest.mark.parametrize("name, fmt, codec", [("ps.mpg", "mpeg", "mpeg1video"), ("ts.ts", "mpegts", "mpeg2video"),
                                               ("es.m2v", "mpeg2video", "mpeg2video")])
def test_mpeg_streams_are_decoded_counting_frames(tmp_path, name, fmt, codec):
    """After a seek, an MPEG-1 program stream with B-frames labelled its pictures 1-2 frames off while
    the numbers still stepped by one: a third of its clips came back with other frames, no error. In
    transport and elementary streams the seek landed past the wanted frame (every clip decoded twice).
    The probe gives them no timeline: the reader counts frames from the start."""
    path = str(tmp_path / name)
    out = av.open(path, "w", format=fmt)
    stream = out.add_stream(codec, rate=25)
    stream.width, stream.height, stream.pix_fmt = 160, 32, "yuv420p"
    stream.codec_context.gop_size = 12
    stream.options = {"bf": "2", "qscale": "2"}
    for i in range(120):
        img = np.zeros((32, 160, 3), np.uint8)
        img[:, : 2 * (i % 40) + 1, 1] = 255  # the bar of _frame_numbers, modulo 40 (it is at most 79 wide)
        for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
            out.mux(packet)
    for packet in stream.encode():
        out.mux(packet)
    out.close()
    info = probe_video(path).info
    assert info.num_frames == 120 and info.timeline is None
    for start in range(1, 100, 7):
        frames = np.arange(start, start + 16, 3)
        assert _frame_numbers(decode_clip_pyav(path, frames, 1000, timeline=info.timeline)) == (frames % 40).tolist()


def test_frames_past_the_decodable_end_repeat_the_last_frame(tmp_path):
    """When fewer frames decode than the probe counted (a file cut short), the reader repeated the last
    *requested* frame that decoded (frames [0, 6, 7] of a 6-frame file gave frame 0 three times); it
    repeats the stream's last frame, as SlowFast clamps to the frames it decoded."""
    path = _numbered_video(str(tmp_path / "six.mkv"), 6)
    assert _frame_numbers(decode_clip_pyav(path, np.array([0, 6, 7]), 1000)) == [0, 5, 5]
    assert _frame_numbers(decode_clip_pyav(path, np.array([7, 8]), 1000)) == [5, 5]  # (it raised: nothing decoded)


def test_long_files_without_seeks_are_named(tmp_path, caplog):
    """Files with uneven frame times (variable rate) are decoded from the first frame for every clip:
    a long one costs that every time, silently. The check names them and says what re-encodes them."""
    from engine.data.loader import LONG_UNEVEN_FRAMES

    n = LONG_UNEVEN_FRAMES + 1
    for d in ("a", "b"):
        os.makedirs(tmp_path / d)
    _numbered_video(str(tmp_path / "a" / "vfr.mp4"), n, pts_ms=[i * 33 + (500 if i >= 10 else 0) for i in range(n)])
    _numbered_video(str(tmp_path / "a" / "short_vfr.mp4"), 40, pts_ms=[i * 33 + (500 if i >= 10 else 0) for i in range(40)])
    _numbered_video(str(tmp_path / "b" / "even.mp4"), n)
    with caplog.at_level(logging.WARNING, logger="engine.data.loader"):
        validate_dataset(cfg_for(str(tmp_path)), "train")
    text = " ".join(r.getMessage() for r in caplog.records)
    assert f"1 of 3 files (first: {tmp_path / 'a' / 'vfr.mp4'}, {n} frames) cannot be seeked in (uneven frame times" in text
    assert "maskfeat data prepare" in text


def _remux(src: str, dst: str, skip: int = 0, shift: int = 0) -> str:
    """Copy ``src``'s packets to ``dst`` without re-encoding: the first ``skip`` dropped (a stream
    cut before its key frame), every time moved ``shift`` ticks earlier (negative times: pre-roll)."""
    with av.open(src) as i, av.open(dst, "w") as o:
        s = i.streams.video[0]
        out = o.add_stream_from_template(s)
        for k, packet in enumerate(p for p in i.demux(s) if p.dts is not None):
            if k >= skip:
                packet.pts, packet.dts, packet.stream = packet.pts - shift, packet.dts - shift, out
                o.mux(packet)
    return dst


def test_cut_streams_number_frames_from_the_first_that_decodes(tmp_path):
    """A cut made without re-encoding (`ffmpeg -ss T -c copy`) starts with pre-roll packets the MP4
    muxer flags to discard, or (Matroska, MP4) with frames before the first key frame, which do not
    decode. The probe counted them: 90 frames where 85 decode, and the seek (numbering frames by
    time from the first packet's) and the count from the start (numbering decoded frames) gave
    different frames, 20 -> 20 against 25. Such an MP4's seek also raised (EPERM), reported as a
    corrupt file. Frame 0 is now the first decoded one on both paths, and a failed seek counts."""
    src = _numbered_video(str(tmp_path / "src.mp4"), 60, gop=10)
    with av.open(src) as c:
        step = int(c.streams.video[0].time_base.denominator / 30)  # ticks per frame (1 ms time base: 33)
    preroll = _remux(src, str(tmp_path / "preroll.mp4"), shift=5 * step)  # frames 0-4 at negative times
    with av.open(preroll) as c:
        assert [p.is_discard for p in c.demux(c.streams.video[0]) if p.size][:6] == [True] * 5 + [False]
    cases = [(preroll, 5, 55)]
    for ext in ("mp4", "mkv"):
        cases.append((_remux(src, str(tmp_path / f"cut.{ext}"), skip=3), 10, 50))  # key frames at 0, 10, ...
    # VP9 raises on the frames before its first key frame (H.264 drops them): the count from the start
    # failed for every clip from frame 0, and so did `--check --full`; DALI's CPU decoder fails on it
    vp9 = _numbered_video(str(tmp_path / "vp9.webm"), 40, gop=10, codec="libvpx-vp9")
    cases.append((_remux(vp9, str(tmp_path / "cut.webm"), skip=3), 10, 30))
    from engine.data.prepare import encode_video

    for path, first, n in cases:
        info = probe_video(path).info
        assert info.num_frames == n and decode_all_frames(path) == (n, ""), path
        # `data prepare`, which reader_problem recommends for them, re-encodes them (VP9 raised)
        fixed = encode_video(path, path + ".fixed.mp4", codec="h264", short_side=32)
        assert fixed == n and _frame_numbers(decode_clip_pyav(path + ".fixed.mp4", np.array([0, n - 1]), 1000)) == \
            [first, first + n - 1], path
        assert not info.key_start and reader_problem(dataclasses.replace(info, codec="vp9"), "cpu", 1)[0] == "key_start"
        for start in (0, 1, n // 2 - 6, n - 13):
            frames = np.arange(start, start + 13, 4)
            want = (frames + first).tolist()
            assert _frame_numbers(decode_clip_pyav(path, frames, 1000, timeline=info.timeline)) == want, (path, start)
            assert _frame_numbers(decode_clip_pyav(path, frames, 1000)) == want, (path, start)
    # a seek before the cut MP4's first key frame raises (EPERM): it decodes counting instead
    path, first, _ = cases[1]
    with av.open(path) as c:
        t0 = min(p.pts for p in c.demux(c.streams.video[0]) if p.size)
    frames = np.arange(4, 17, 4)
    step = probe_video(path).info.timeline[1]
    assert _frame_numbers(decode_clip_pyav(path, frames, 1000, timeline=(t0, step))) == (frames + first).tolist()
    assert probe_video(src).info.key_start and reader_problem(probe_video(vp9).info, "cpu", 1) is None


def test_a_timestamp_reset_keeps_every_frame(tmp_path):
    """Two MPEG-TS files joined byte by byte (`cat a.ts b.ts`), the second's times starting before the
    first's: frames before the first decoded frame's time were dropped from the count everywhere in
    the file, so the second half could not be sampled (60 of 120 frames)."""
    a = _numbered_video(str(tmp_path / "a.ts"), 30, gop=10, pts_ms=[10000 + round(i * 1000 / 30) for i in range(30)])
    b = _numbered_video(str(tmp_path / "b.ts"), 30, gop=10, first=30, pts_ms=[70 + round(i * 1000 / 30) for i in range(30)])
    joined = tmp_path / "joined.ts"
    joined.write_bytes(open(a, "rb").read() + open(b, "rb").read())
    info = probe_video(str(joined)).info
    assert info.num_frames == 60 and info.timeline is None  # uneven times: counted from the start
    assert info.fps == pytest.approx(30, rel=0.01)  # the declared rate: not the mean over a reset
    frames = np.array([0, 20, 40, 59])
    assert _frame_numbers(decode_clip_pyav(str(joined), frames, 1000)) == frames.tolist()


def test_fps_follows_the_frames_not_a_long_last_frame(tmp_path):
    """An MP4 of 30 fps frames whose last frame lasts 2 s declares an average rate of 13.8 (frames
    over duration); its times are evenly spaced, so it passed as constant-rate with fps 13.8, and a
    16x4 clip was sampled 1.83 frames apart instead of 4."""
    path = str(tmp_path / "long_last.mp4")
    out = av.open(path, "w")
    stream = out.add_stream("libx264", rate=30)
    stream.width, stream.height, stream.pix_fmt = 64, 32, "yuv420p"
    packets = []
    for i in range(50):
        packets += stream.encode(av.VideoFrame.from_ndarray(np.full((32, 64, 3), i, np.uint8), format="rgb24"))
    packets += stream.encode()
    for k, p in enumerate(packets):
        if k == len(packets) - 1:
            p.duration = int(2.0 / p.time_base)
        out.mux(p)
    out.close()
    with av.open(path) as c:
        assert float(c.streams.video[0].average_rate) < 15
    info = probe_video(path).info
    assert info.cfr and info.fps == pytest.approx(30, rel=1e-3)
    # `data prepare` (no --fps) keeps that rate: at the declared 13.8 it wrote 23 frames for 50 and failed
    from engine.data.prepare import encode_video

    assert encode_video(path, str(tmp_path / "out.webm"), short_side=32) == 50
    assert probe_video(str(tmp_path / "out.webm")).info.fps == pytest.approx(30, rel=1e-3)


def test_probe_cache_saves_of_ranks_with_one_pid_do_not_collide(tmp_path, monkeypatch, capsys):
    """Every rank saves the probe cache, on a shared filesystem into one place, and in containers
    ranks on different nodes can share a pid: a pid-named temporary file was renamed away under
    one of them (FileNotFoundError, the rank died). Each save now writes a temporary file of its
    own; a save that fails anyway is a warning, not an error."""
    from engine.data.probe import ProbeCache

    monkeypatch.setattr(os, "getpid", lambda: 41)
    video = write_video(str(tmp_path / "v.mp4"))
    path = str(tmp_path / "probe.json")
    caches = [ProbeCache(path) for _ in range(8)]
    for c in caches:
        c.put(probe_video(video))
    errors = []

    def save(c):
        try:
            for _ in range(20):
                c.save()
        except Exception as e:  # what a rank would die of
            errors.append(e)

    threads = [threading.Thread(target=save, args=(c,)) for c in caches]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert ProbeCache(path).get(video) is not None  # a complete cache file won
    from engine.data import probe

    assert os.stat(path).st_mode & 0o777 == 0o666 & ~probe._UMASK  # readable by others, as open() made it
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []
    def unwritable(*a, **k):  # (a read-only folder does not stop root, who runs these tests in CI)
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(probe.tempfile, "mkstemp", unwritable)
    capsys.readouterr()
    ProbeCache(str(tmp_path / "probe2.json")).save()  # unwritable: a warning, not an error
    assert "could not save the probe cache" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "probe2.json")


# ---- codecs FFmpeg cannot decode; I/O errors; non-square pixels ------------------------------------

def test_a_codec_without_a_decoder_is_a_bad_file_not_a_crash(tmp_path):
    """PyAV leaves ``codec_context`` None for a stream FFmpeg has no decoder for (an unknown FourCC):
    the probe raised AttributeError, which stopped validation under `skip` too and lost the probe
    cache of every file probed before it."""
    from engine.data.prepare import EncodeError, encode_video

    good = write_video(str(tmp_path / "a" / "good.avi"), n=6)
    data = open(good, "rb").read()
    assert data.count(b"MJPG") >= 1
    unknown = str(tmp_path / "a" / "unknown.avi")
    open(unknown, "wb").write(data.replace(b"MJPG", b"ZZZZ"))
    res = probe_video(unknown)
    assert (res.info, res.reason) == (None, "codec") and "no decoder" in res.detail
    cache = str(tmp_path / "cache.json")
    report = validate_files([good, unknown], cache_path=cache)
    assert list(report.good) == [good] and [(b.path, b.reason) for b in report.bad] == [(unknown, "codec")]
    assert validate_files([good, unknown], cache_path=cache).cached == 2
    with pytest.raises(EncodeError, match="no decoder"):
        encode_video(unknown, str(tmp_path / "out.webm"), short_side=32)


def test_io_errors_are_unreadable_and_not_cached(tmp_path, monkeypatch):
    """An I/O error while FFmpeg opens or reads a file (EIO, ESTALE on a network filesystem) was
    cached as not_video / decode_error under the file's unchanged size and mtime: the file stayed
    bad in every later run (skipped from training, or refusing to start under `error`). It is the
    storage when a plain read fails too (faked here); FFmpeg's EIO for a cut-short Matroska file,
    which reads fine, stays a cached content error."""
    import builtins
    import errno

    import engine.data.probe as probe

    path = write_video(str(tmp_path / "v.avi"), n=6)
    cache = str(tmp_path / "cache.json")
    real_open = av.open

    class Flaky:  # the storage: the first byte reads, the rest fails
        def __init__(self, *args, **kwargs):
            self._f = builtins.open(*args, **kwargs)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self._f.close()

        def read(self, n=-1):
            if self._f.tell() > 0 or n != 1:
                raise OSError(errno.EIO, "Input/output error")
            return self._f.read(n)

    def failing_open(*args, **kwargs):
        raise av.error.OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(probe, "open", Flaky, raising=False)
    monkeypatch.setattr(probe.av, "open", failing_open)
    report = validate_files([path], cache_path=cache)
    assert [(b.reason, "Input/output error" in b.detail) for b in report.bad] == [("unreadable", True)]
    monkeypatch.setattr(probe.av, "open", real_open)
    monkeypatch.delattr(probe, "open")
    report = validate_files([path], cache_path=cache)
    assert (list(report.good), report.cached) == ([path], 0)

    class FailingDemux:  # the open succeeds, a read fails half-way
        def __init__(self, container):
            self._c = container

        def __getattr__(self, name):
            return getattr(self._c, name)

        def demux(self, *args, **kwargs):
            raise av.error.OSError(errno.ESTALE, "Stale file handle")

    monkeypatch.setattr(probe.av, "open", lambda *a, **k: FailingDemux(real_open(*a, **k)))
    monkeypatch.setattr(probe, "open", Flaky, raising=False)
    res = probe_video(path)
    assert res.reason == "unreadable" and "Stale file handle" in res.detail
    monkeypatch.setattr(probe.av, "open", real_open)
    monkeypatch.delattr(probe, "open")
    # a Matroska file cut short: FFmpeg says EIO, a plain read is fine: the content, cached
    mkv = write_video(str(tmp_path / "cut.mkv"), n=12)
    data = open(mkv, "rb").read()
    reasons = set()
    for cut in (40, 80, 120, 160):
        open(mkv, "wb").write(data[:cut])
        res = probe_video(mkv)
        reasons.add(res.reason)
        assert res.reason != "unreadable", (cut, res)
    validate_files([mkv], cache_path=cache)
    assert validate_files([mkv], cache_path=cache).cached == 1
    assert reasons - {"not_video", "decode_error", "codec"} == set()


def test_a_file_that_changes_while_probed_is_not_cached(tmp_path, monkeypatch):
    """The cache key was taken after the probe: a copy finishing during it stored the truncated
    copy's result under the complete file's size and mtime. A probe that stops the pass keeps
    what was probed before it."""
    import engine.data.probe as probe

    a, b = write_video(str(tmp_path / "a.avi"), n=6), write_video(str(tmp_path / "b.avi"), n=6)
    cache = str(tmp_path / "cache.json")
    real = probe.probe_video

    def growing(path):
        res = real(path)
        if path == b:
            with open(path, "ab") as f:
                f.write(b"\0" * 16)
        return res

    monkeypatch.setattr(probe, "probe_video", growing)
    validate_files([a, b], cache_path=cache, workers=1)
    assert sorted(json.load(open(cache))["entries"]) == [os.path.abspath(a)]

    def stopping(path):
        if path == b:
            raise KeyboardInterrupt
        return real(path)

    os.remove(cache)
    monkeypatch.setattr(probe, "probe_video", stopping)
    with pytest.raises(KeyboardInterrupt):
        validate_files([a, b], cache_path=cache, workers=1)
    assert sorted(json.load(open(cache))["entries"]) == [os.path.abspath(a)]


def test_prepare_writes_square_pixels(tmp_path):
    """An anamorphic file (1440x1080 AVCHD, DV, DVD: pixels shown wider than stored) was re-encoded
    at its stored shape with square pixels, so the prepared clip showed squeezed (16:9 as 4:3)."""
    from fractions import Fraction

    from engine.data.prepare import encode_video

    W, H = 48, 36  # shown at 64x36 (16:9) with pixels 4:3 wide
    yy, xx = np.mgrid[0:H, 0:W]
    a = np.zeros((H, W, 3), np.uint8)
    a[(xx * 4 / 3 - 32) ** 2 + (yy - 18) ** 2 < 14 ** 2] = 255  # a disc where shown, an ellipse where stored

    def anamorphic(path: str, codec: str, **opts) -> str:
        c = av.open(path, "w")
        s = c.add_stream(codec, rate=24)
        s.width, s.height = W, H
        for k, v in opts.items():
            setattr(s, k, v)
        s.codec_context.sample_aspect_ratio = Fraction(4, 3)
        for _ in range(6):
            for p in s.encode(av.VideoFrame.from_ndarray(a, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
        c.close()
        return path

    src = anamorphic(str(tmp_path / "sar.mp4"), "mjpeg", pix_fmt="yuvj420p")
    with av.open(src) as c:
        assert c.streams.video[0].codec_context.sample_aspect_ratio == Fraction(4, 3)
    out = str(tmp_path / "out.webm")
    encode_video(src, out, codec="vp9", short_side=36)
    info = probe_video(out).info
    assert (info.width, info.height) == (64, 36)
    with av.open(out) as c:
        assert c.streams.video[0].codec_context.sample_aspect_ratio in (None, 0, 1)
    disc = decode_clip_pyav(out, np.array([0]), 36)[0].mean(-1) > 128
    rows, cols = np.nonzero(disc)
    width, height = cols.max() - cols.min() + 1, rows.max() - rows.min() + 1
    assert abs(width - height) <= 2, (width, height)  # round again
    # VP9 has no aspect ratio in its bitstream: an MP4's pasp box holds it (the container's, read first)
    vp9 = anamorphic(str(tmp_path / "pasp.mp4"), "libvpx-vp9")
    with av.open(vp9) as c:
        assert c.streams.video[0].codec_context.sample_aspect_ratio in (None, 0, 1)  # only the container's
    encode_video(vp9, out, codec="vp9", short_side=36)
    assert (probe_video(out).info.width, probe_video(out).info.height) == (64, 36)


def _on_rank0_worker(rank: int, init: str, out: str) -> None:
    from engine.config import ConfigError
    from engine.runner import on_rank0

    torch.distributed.init_process_group("gloo", init_method=init, rank=rank, world_size=2,
                                         timeout=datetime.timedelta(seconds=60))
    got = []
    try:
        for fn in (lambda: 7, lambda: (_ for _ in ()).throw(ConfigError("bad key")),
                   lambda: open(os.path.join(out, "missing", "x"))):
            try:
                got.append(["ok", on_rank0(fn)])
            except Exception as e:
                got.append([type(e).__name__, str(e)])
        with open(f"{out}/{rank}.json", "w") as f:
            json.dump(got, f)
    finally:
        torch.distributed.destroy_process_group()


def test_on_rank0_hands_every_failure_to_every_rank(tmp_path):
    """Rank 0's result, or its error, on every rank: an error other than a ConfigError (an OSError
    reading the output folder) left the other ranks in the broadcast until the timeout."""
    import torch.multiprocessing as mp

    mp.spawn(_on_rank0_worker, args=(f"file://{tmp_path / 'store'}", str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (json.load(open(tmp_path / f"{r}.json")) for r in (0, 1))
    assert r0[:2] == r1[:2] == [["ok", 7], ["ConfigError", "bad key"]]
    assert r0[2][0] == "FileNotFoundError" and r1[2][0] == "RuntimeError"
    assert r1[2][1].startswith("rank 0 failed (FileNotFoundError: [Errno 2]")
