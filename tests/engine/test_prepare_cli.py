"""``maskfeat data prepare`` on every source layout, and the command line's data errors.

Source clips are tiny MJPEG files in Matroska written with PyAV, whose frame timestamps the tests
choose (Matroska accepts repeated timestamps): frame ``i`` has red channel ``20*i``, so the order
and number of frames that come out of the re-encoding can be read back from the pixels.
Covered: split folders ``SRC/{train,val}/<class>/`` give one list per split with train's class
index; a val class that train lacks, a mixed layout and colliding output names are data errors
before anything is encoded; whitespace in names becomes ``_``; no temporary file is ever left;
a source whose timestamps never increase keeps every frame; a frame count that does not match is
a per-file failure; DST equal to SRC or inside it is a usage error (exit 2); ``maskfeat`` turns
dataset listing errors into "data error" + exit 5 but keeps the traceback of a genuine bug, and an
unreadable --config or a missing --checkpoint into a config error (exit 2).
"""
from __future__ import annotations

import json
import os
from fractions import Fraction

import av
import numpy as np
import pytest

from engine import cli
from engine.data.datasets import load_dataset, read_list_file
from engine.data.errors import DataError
from engine.data.prepare import SETTINGS_FILE, encode_video, prepare_dataset, prepare_main
from engine.data.probe import probe_video

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = os.path.join(REPO, "tests", "engine", "tiny.yaml")
W, H = 48, 32


def make_clip(path: str, n: int = 6, pts_ms: list[int] | None = None, rate: int = 25) -> str:
    """An MJPEG/Matroska clip of ``n`` frames at a declared ``rate`` fps; ``pts_ms`` overrides the
    timestamps (milliseconds) of the stored frames."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    pts_ms = [40 * i for i in range(n)] if pts_ms is None else pts_ms
    c = av.open(path, "w", format="matroska")
    s = c.add_stream("mjpeg", rate=rate)
    s.width, s.height, s.pix_fmt = W, H, "yuvj420p"
    for i, t in enumerate(pts_ms):
        img = np.zeros((H, W, 3), np.uint8)
        img[..., 0] = 20 * i
        for p in s.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):  # MJPEG: one packet per frame
            p.pts = p.dts = t
            p.time_base = Fraction(1, 1000)
            c.mux(p)
    for p in s.encode():
        c.mux(p)
    c.close()
    return path


def red_levels(path: str) -> list[int]:
    """Mean red channel of each decoded frame."""
    with av.open(path) as c:
        return [int(round(f.to_ndarray(format="rgb24")[..., 0].mean())) for f in c.decode(c.streams.video[0])]


def all_files(root) -> list[str]:
    """Files under ``root`` (relative), but prepare's settings record."""
    return sorted(os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs
                  if f != SETTINGS_FILE)


FAST = ["--short-side", "16", "--workers", "2", "--gop", "4"]


def test_split_folders_give_one_list_per_split_with_trains_class_index(tmp_path, capsys):
    src, dst = tmp_path / "src", tmp_path / "dst"
    for cls in ("cat", "ant", "bee"):
        make_clip(str(src / "train" / cls / "t.mkv"))
    for cls in ("bee", "cat"):  # val lacks "ant": its labels must still be train's
        make_clip(str(src / "val" / cls / "v.mkv"))
    assert prepare_main([str(src), "--check"]) == 0
    assert "validated 5 files: 5 good" in capsys.readouterr().out  # train and val
    assert prepare_main([str(src), str(dst), *FAST]) == 0
    assert "train.csv 3, val.csv 2; 3 classes" in capsys.readouterr().out
    assert (dst / "train.csv").read_text().splitlines() == [
        "train/ant/t.webm 0", "train/bee/t.webm 1", "train/cat/t.webm 2"]
    assert (dst / "val.csv").read_text().splitlines() == ["val/bee/v.webm 1", "val/cat/v.webm 2"]
    assert not (dst / "test.csv").exists()
    assert json.loads((dst / "classes.json").read_text())["classes"] == ["ant", "bee", "cat"]
    val = load_dataset("kinetics", str(dst), "val", ())
    assert val.class_names == ["ant", "bee", "cat"] and val.labels == [1, 2]
    assert val.paths == [str(dst / "val" / "bee" / "v.webm"), str(dst / "val" / "cat" / "v.webm")]
    assert len(red_levels(val.paths[0])) == 6
    # plain class folders keep their behaviour: every file in train.csv
    flat = tmp_path / "flat"
    for cls in ("b", "a"):
        make_clip(str(flat / cls / "x.mkv"))
    assert prepare_main([str(flat), str(tmp_path / "flat_out"), *FAST]) == 0
    assert (tmp_path / "flat_out" / "train.csv").read_text().splitlines() == ["a/x.webm 0", "b/x.webm 1"]
    assert not (tmp_path / "flat_out" / "val.csv").exists()


@pytest.mark.parametrize("case", ["val_class_not_in_train", "mixed_layout", "name_collision", "folder_collision"])
def test_inconsistent_sources_are_data_errors_before_encoding(tmp_path, capsys, case):
    """A name collision (two files, or two class folders: ``a b/`` and ``a_b/`` were merged into one
    folder of two labels) stops prepare; ``--check`` says it and goes on (a folder dataset trains on SRC
    as it is: it stopped with exit 5 and validated nothing)."""
    src, dst = tmp_path / "src", tmp_path / "dst"
    make_clip(str(src / "train" / "cat" / "a b.mkv"))
    collision = case.endswith("collision")
    if case == "val_class_not_in_train":
        make_clip(str(src / "val" / "zebra" / "v.mkv"))
        expect = "zebra"
    elif case == "mixed_layout":
        make_clip(str(src / "dog" / "v.mkv"))
        expect = "dog"
    elif case == "name_collision":
        make_clip(str(src / "train" / "cat" / "a_b.mkv"))
        expect = "a_b.webm"
    else:
        make_clip(str(src / "train" / "c d" / "x.mkv"))
        make_clip(str(src / "train" / "c_d" / "y.mkv"))
        expect = "the folders 'train/c d' and 'train/c_d' of"
    for argv in ([str(src), str(dst), *FAST], [str(src), "--check"]):
        check = argv[-1] == "--check"
        assert prepare_main(argv) == (0 if check and collision else 5)
        err = capsys.readouterr().err
        assert expect in err and "Traceback" not in err, err
        assert ("note: `data prepare` of SRC would stop" if check and collision else "data error") in err
    assert not dst.exists()  # nothing encoded or written


def test_long_names_and_broken_links(tmp_path, capsys):
    """A source name near the 255-byte limit failed for its temporary name (7+ bytes longer: "File name too
    long"); a broken symbolic link was reported as "no such file" though the user sees it in the folder."""
    src, dst = tmp_path / "src", tmp_path / "dst"
    long = "x" * 245
    make_clip(str(src / "a" / f"{long}.mkv"))
    os.symlink(str(tmp_path / "gone.mkv"), src / "a" / "link.mkv")
    assert prepare_main([str(src), str(dst), *FAST]) == 1
    err = capsys.readouterr().err
    assert f"link.mkv: a symbolic link to {tmp_path / 'gone.mkv'}, which does not exist" in err, err
    assert all_files(dst) == ["a/" + long + ".webm", "classes.json", "train.csv"]


def test_workers_default_to_the_cpus_this_process_may_use(monkeypatch):
    """``--workers`` defaults to the CPU affinity (a SLURM/cgroup allocation), not the node's CPU count."""
    from engine.data import prepare

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {3, 5}, raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 128)
    assert prepare.build_prepare_parser().parse_args(["x"]).workers == 2


def test_one_file_listed_under_two_spellings_is_one_output(tmp_path, capsys, monkeypatch):
    """``../ext/v.mkv`` and its absolute path in the lists of a SRC given as a relative path: one file,
    one output, two list lines (it was called a name collision of two files)."""
    src, dst = tmp_path / "src", tmp_path / "dst"
    make_clip(str(tmp_path / "ext" / "v.mkv"))
    make_clip(str(src / "a" / "w.mkv"))
    (src / "train.csv").write_text(f"../ext/v.mkv 0\n{tmp_path / 'ext' / 'v.mkv'} 0\na/w.mkv 1\n")
    monkeypatch.chdir(tmp_path)
    assert prepare_main(["src", str(dst), *FAST]) == 0, capsys.readouterr().err
    lines = (dst / "train.csv").read_text().splitlines()
    assert lines == ["external/up/ext/v.webm 0", "external/up/ext/v.webm 0", "a/w.webm 1"], lines


def test_whitespace_in_names_becomes_underscore_and_lists_read_back(tmp_path, capsys):
    src, dst = tmp_path / "src", tmp_path / "dst"
    make_clip(str(src / "my class" / "clip one.mkv"))
    make_clip(str(src / "other" / "two\tthree.mkv"))
    assert prepare_main([str(src), str(dst), *FAST]) == 0
    out = capsys.readouterr().out
    assert "2 output names had whitespace replaced by '_'" in out
    assert all_files(dst) == ["classes.json", "my_class/clip_one.webm", "other/two_three.webm", "train.csv"]
    ds = read_list_file(str(dst / "train.csv"), str(dst))
    assert ds.class_names == ["my class", "other"] and ds.labels == [0, 1]  # class names keep their spaces
    assert all(os.path.isfile(p) for p in ds.paths)
    assert os.path.isfile(src / "my class" / "clip one.mkv")  # sources keep their names


def test_a_rerun_with_other_settings_over_existing_outputs_is_a_data_error(tmp_path, capsys):
    """DST records its encoding settings; a re-run with others skipped the existing outputs (their names
    were taken) and reported success: a re-run at --short-side 403 kept every 320 px video."""
    src, dst = tmp_path / "src", tmp_path / "dst"
    make_clip(str(src / "a" / "v.mkv"))
    assert prepare_main([str(src), str(dst), *FAST]) == 0
    assert json.loads((dst / SETTINGS_FILE).read_text()) == {"vp9": {"fps": 0.0, "gop": 4, "short_side": 16}}
    assert prepare_main([str(src), str(dst), *FAST]) == 0  # the same settings: a resume
    capsys.readouterr()
    assert prepare_main([str(src), str(dst), *FAST, "--short-side", "24", "--fps", "10"]) == 5
    err = capsys.readouterr().err
    assert "holds vp9 videos prepared with other settings: fps 0.0 (now 10.0), short_side 16 (now 24)" in err, err
    # each codec has its own entry (its own file names): h264 beside vp9, then vp9 again as recorded
    assert prepare_main([str(src), str(dst), *FAST, "--short-side", "24", "--codec", "h264"]) == 0
    assert prepare_main([str(src), str(dst), *FAST]) == 0
    assert json.loads((dst / SETTINGS_FILE).read_text())["h264"]["short_side"] == 24
    os.remove(dst / "a" / "v.webm")  # no vp9 output left: its entry is replaced
    assert prepare_main([str(src), str(dst), *FAST, "--short-side", "24"]) == 0
    assert json.loads((dst / SETTINGS_FILE).read_text())["vp9"]["short_side"] == 24
    assert probe_video(str(dst / "a" / "v.webm")).info.height == 24
    with pytest.raises(SystemExit):  # nan: its record never matched itself
        prepare_main([str(src), str(dst), *FAST, "--fps", "nan"])


def test_source_without_increasing_timestamps_keeps_every_frame(tmp_path):
    n = 7
    src = make_clip(str(tmp_path / "zero.mkv"), pts_ms=[0] * n)
    with av.open(src) as c:  # the source really has no usable timestamps
        assert {f.pts for f in c.decode(c.streams.video[0])} == {0}
    want = red_levels(src)  # about 20 * i (JPEG rounding)
    for codec, ext in (("vp9", ".webm"), ("h264", ".mp4")):
        out = str(tmp_path / f"zero{ext}")
        assert encode_video(src, out, codec=codec, short_side=16) == n
        levels = red_levels(out)  # every frame once, in order, at its level (MJPEG's full range converted)
        assert len(levels) == n and np.all(np.abs(np.array(levels) - want) <= 4), (levels, want)
    # a repeated timestamp in the middle: that frame is placed one frame interval after the previous one
    src = make_clip(str(tmp_path / "dup.mkv"), pts_ms=[0, 40, 80, 80, 120])
    assert encode_video(src, str(tmp_path / "dup.webm"), short_side=16) == 5
    levels = red_levels(str(tmp_path / "dup.webm"))
    assert np.all(np.abs(np.array(levels) - red_levels(src)) <= 4), levels


@pytest.mark.parametrize("jitter", [False, True])
def test_rounded_or_jittered_timestamps_keep_every_frame(tmp_path, jitter):
    """30 fps in Matroska's milliseconds (0, 33, 67, 100, ...) or with a phone's ±1 ms jitter: each
    output slot shows the source frame nearest to it. It showed the latest frame at or before it,
    so a frame rounded up lost its slot to a repeat of the previous one: 22 of 61 frames of a
    29.97 fps WebM were repeats, their neighbours gone, and the frame count still passed."""
    n = 12
    pts = [round(1000 * i / 30) + ((1 if i % 2 else -1) if jitter and i else 0) for i in range(n)]
    src = make_clip(str(tmp_path / "r.mkv"), n=n, pts_ms=pts, rate=30)
    want = np.array(red_levels(src))  # about 20 * i
    assert len(want) == n and np.all(np.diff(want) > 10)
    out = str(tmp_path / "r.webm")
    assert encode_video(src, out, short_side=16, fps=30) == n
    assert np.all(np.abs(np.array(red_levels(out)) - want) <= 4), (red_levels(out), want)
    half = str(tmp_path / "half.webm")  # 15 fps: every other frame, the ones at the output times
    assert encode_video(src, half, short_side=16, fps=15) == n // 2
    assert np.all(np.abs(np.array(red_levels(half)) - want[::2]) <= 4), (red_levels(half), want[::2])


@pytest.mark.parametrize("colorspace,color_range", [(1, 1), (1, 2), (5, 1)])  # BT.709, full-range 709, BT.601
def test_colours_are_kept_whatever_the_source_colorspace(tmp_path, colorspace, color_range):
    """HD video is BT.709: its YUV was copied into an untagged output that decoders read as BT.601
    (red 200 came back as 185). Now converted to BT.601 and tagged so."""
    src = str(tmp_path / "c.mp4")
    w, h = 96, 64
    with av.open(src, "w") as c:
        s = c.add_stream("libx264", rate=25)
        s.width, s.height, s.pix_fmt = w, h, "yuv420p"
        s.codec_context.colorspace = s.codec_context.color_primaries = s.codec_context.color_trc = colorspace
        s.codec_context.color_range = color_range
        img = np.zeros((h, w, 3), np.uint8)
        img[:, : w // 2], img[:, w // 2:] = (200, 30, 30), (30, 60, 200)
        for i in range(4):
            f = av.VideoFrame.from_ndarray(img, format="rgb24").reformat(
                format="yuv420p", dst_colorspace=colorspace, dst_color_range=color_range)
            f.pts = i
            for pk in s.encode(f):
                c.mux(pk)
        for pk in s.encode():
            c.mux(pk)

    def colours(path):
        with av.open(path) as c:
            a = next(c.decode(c.streams.video[0])).to_ndarray(format="rgb24").astype(float)
        q = a.shape[1] // 4
        return np.concatenate([a[:, :q].reshape(-1, 3).mean(0), a[:, -q:].reshape(-1, 3).mean(0)])

    out = str(tmp_path / "c.webm")
    assert encode_video(src, out, short_side=64) == 4
    assert np.abs(colours(out) - colours(src)).max() <= 4, (colours(out), colours(src))
    with av.open(out) as c:  # tagged, so that a decoder that defaults otherwise reads it right too
        f = next(c.decode(c.streams.video[0]))
        assert (int(f.colorspace), int(f.color_range)) == (5, 1)


def test_doubling_the_rate_shows_each_frame_twice_in_place(tmp_path):
    """25 -> 50 fps: every other output time is a midpoint between two source frames; it goes to
    the earlier one, and the last frame fills the end: 0 0 1 1 ... 7 7 (ties to the later frame
    gave 0 1 1 2 ... 7 7 7, every frame half a source frame early)."""
    src = make_clip(str(tmp_path / "x.mkv"), n=8)  # 40 ms apart, exactly
    want = np.repeat(np.array(red_levels(src)), 2)
    out = str(tmp_path / "x50.webm")
    assert encode_video(src, out, short_side=16, fps=50) == 16
    assert np.all(np.abs(np.array(red_levels(out)) - want) <= 4), (red_levels(out), want)


def test_small_vp9_is_scaled_up_to_what_nvdec_decodes(tmp_path):
    """A 48x32 source became 48x32 VP9, which NVDEC refuses (128x128): one such file moved the whole
    dataset's ``auto`` reader to PyAV. H.264 and an explicitly small --short-side are left alone."""
    from engine.data.probe import reader_problem

    src = make_clip(str(tmp_path / "small.mkv"), n=4)  # 48 x 32
    sizes = {}
    for name, codec, short in (("v.webm", "vp9", 320), ("h.mp4", "h264", 320), ("s.webm", "vp9", 16)):
        out = str(tmp_path / name)
        encode_video(src, out, codec=codec, short_side=short)
        info = probe_video(out).info
        sizes[name] = (info.width, info.height)
        if name == "v.webm":
            assert reader_problem(info, "gpu", 1) is None
    assert sizes == {"v.webm": (192, 128), "h.mp4": (48, 32), "s.webm": (24, 16)}


def test_frame_count_mismatch_is_a_failure_and_leaves_no_temporary_file(tmp_path, capsys):
    """A clip of 8 frames at 25 fps whose last one comes 1.7 s late (a freeze: the probe keeps the
    declared rate): without --fps its re-encoding would hold about 50 frames, so it fails (and is
    left out of the list); with --fps it is resampled. A clip stamped at 12.5 fps in a stream declared
    25 fps keeps its 8 frames: the rate is the probe's, from the frames' times (it failed too)."""
    src, dst = tmp_path / "src", tmp_path / "dst"
    bad = make_clip(str(src / "c" / "frozen.mkv"), pts_ms=[40 * i for i in range(7)] + [2000], n=8)
    make_clip(str(src / "c" / "ok.mkv"))
    slow = make_clip(str(tmp_path / "slow.mkv"), pts_ms=[80 * i for i in range(8)], n=8)
    assert encode_video(slow, str(tmp_path / "slow.webm"), short_side=16) == 8
    assert probe_video(str(tmp_path / "slow.webm")).info.fps == pytest.approx(12.5)
    with pytest.raises(RuntimeError, match="for 8 source frames"):
        encode_video(bad, str(tmp_path / "frozen.webm"), short_side=16)
    assert all_files(src) == ["c/frozen.mkv", "c/ok.mkv"]
    assert prepare_main([str(src), str(dst), *FAST]) == 1
    captured = capsys.readouterr()
    assert f"failed: {bad}: RuntimeError" in captured.err and "(1 failures)" in captured.out
    assert (dst / "train.csv").read_text().splitlines() == ["c/ok.webm 0"]
    assert all_files(dst) == ["c/ok.webm", "classes.json", "train.csv"]
    assert encode_video(bad, str(tmp_path / "frozen.webm"), short_side=16, fps=25) > 40


def _job_that_kills_its_process(args):
    """prepare's job, except that a source named ``killer*`` kills its worker process (as the OOM
    killer or an FFmpeg crash would), after leaving a temporary file as a half-done encode does."""
    import signal

    from engine.data import prepare as P

    if os.path.basename(args[0]).startswith("killer"):
        folder = os.path.dirname(args[1])
        os.makedirs(folder, exist_ok=True)
        run = os.environ[P.RUN_TOKEN_ENV]  # (the run's token: another run's files of the same pid are not ours)
        open(os.path.join(folder, f".{os.path.basename(args[1])}.{run}.part{os.getpid()}"), "w").close()
        open(os.path.join(folder, f".{os.path.basename(args[1])}.0other00.part{os.getpid()}"), "w").close()
        os.kill(os.getpid(), signal.SIGKILL)
    return P._real_job(args)


def test_a_worker_killed_mid_encode_is_named_and_the_rest_is_done(tmp_path, capsys, monkeypatch):
    """A worker process killed by a signal broke the pool: a BrokenProcessPool traceback (exit 1), no
    lists, the file not named, and the killed workers' temporary files left in DST for good. Now the
    others are encoded in a new pool, the file whose process dies alone is the one reported, and the
    leftovers of dead processes are removed at the next run."""
    import multiprocessing

    from engine.data import prepare as P

    if multiprocessing.get_start_method() != "fork":
        pytest.skip("the patched job reaches the workers only when they are forked")
    src, dst = tmp_path / "src", tmp_path / "dst"
    for name in ("a", "b", "killer", "c", "d"):
        make_clip(str(src / "cls" / f"{name}.mkv"))
    os.makedirs(dst / "cls")
    old = dst / "cls" / ".old.webm.part999999999"
    old.write_text("left by a process killed in an earlier run")
    fresh = dst / "cls" / ".new.webm.part999999998"  # its pid is gone here, but it is being written (another host)
    fresh.write_text("")
    os.utime(old, (0, 0))
    monkeypatch.setattr(P, "_real_job", P._job, raising=False)
    monkeypatch.setattr(P, "_job", _job_that_kills_its_process)
    assert prepare_main([str(src), str(dst), *FAST]) == 1
    captured = capsys.readouterr()
    killer = str(src / "cls" / "killer.mkv")
    assert f"failed: {killer}: the process encoding it died (killed by a signal" in captured.err, captured.err
    assert "(1 failures)" in captured.out and "Traceback" not in captured.err
    assert sorted((dst / "train.csv").read_text().splitlines()) == [f"cls/{n}.webm 0" for n in "abcd"]
    leftovers = [f for f in all_files(dst) if ".part" in f]
    # the killed workers' temporary files are removed once the pool ended (they stayed until a run 10
    # minutes later); the fresh one of another host is kept
    # (and another run's file of a killed worker's pid: a container's run sharing DST)
    other = [f for f in leftovers if ".0other00.part" in f]
    assert not old.exists() and sorted(leftovers) == sorted(["cls/.new.webm.part999999998", *other]), leftovers
    assert other and all(f.startswith("cls/.killer.webm.0other00.part") for f in other), other
    for f in leftovers:
        os.utime(dst / f, (0, 0))
    monkeypatch.setattr(P, "_job", P._real_job)
    assert prepare_main([str(src), str(dst), *FAST]) == 0  # the rerun encodes it and cleans the dead ones' files
    assert [f for f in all_files(dst) if ".part" in f] == []
    # an old file of a process that is alive here (another prepare, stalled): not ours to remove
    from engine.data.prepare import remove_stale_parts

    alive = dst / "cls" / f".slow.webm.part{os.getpid()}"
    alive.write_text("")
    os.utime(alive, (0, 0))
    assert remove_stale_parts(str(dst)) == 0 and alive.exists()


def test_a_worker_killed_while_jobs_are_submitted(tmp_path, monkeypatch):
    """Submitting many jobs takes a while (a second at Kinetics scale): a worker that dies meanwhile
    breaks ``submit`` itself, and that BrokenProcessPool escaped as a traceback. Every job is
    accounted for: ended, or handed back for the next pool. (The break is made to happen at the
    fifth submit: a real one depends on timing.)"""
    from concurrent.futures.process import BrokenProcessPool

    from engine.data import prepare as P

    class BreaksAtTheFifth(P.ProcessPoolExecutor):
        calls = 0

        def submit(self, *a, **k):
            BreaksAtTheFifth.calls += 1
            if BreaksAtTheFifth.calls == 5:
                raise BrokenProcessPool("a child process terminated abruptly")
            return super().submit(*a, **k)

    monkeypatch.setattr(P, "ProcessPoolExecutor", BreaksAtTheFifth)
    todo = [(str(tmp_path / f"missing{i}.mkv"), str(tmp_path / "out" / f"{i}.webm"), "vp9", 16, 0.0, 4)
            for i in range(20)]

    class Bar:
        def update(self, k):
            pass

    failures: dict = {}
    ended, pending = P._run_jobs(todo, 2, failures, Bar())
    assert (ended, pending) == (4, todo[4:]) and len(failures) == 4  # "no such file" for the first four


def test_ctrl_c_stops_the_queue(tmp_path, capsys, monkeypatch):
    """Ctrl-C used to wait for every queued video to be encoded (the pool's exit waits for its
    jobs), then print a traceback; now the jobs not started are cancelled and the message says
    that a rerun finishes."""
    from engine.data import prepare as P

    src, dst = tmp_path / "src", tmp_path / "dst"
    for i in range(10):
        make_clip(str(src / "cls" / f"v{i}.mkv"))

    class Interrupted:  # the progress bar: Ctrl-C arrives as the first video ends
        def __init__(self, *a, **k):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *a):
            return False

        def update(self, n):
            raise KeyboardInterrupt

    import engine.logging

    monkeypatch.setattr(engine.logging, "work_progress", Interrupted)
    assert prepare_main([str(src), str(dst), "--short-side", "16", "--workers", "1", "--gop", "4"]) == 130
    assert "interrupted; the videos written so far are kept" in capsys.readouterr().err
    done = [f for f in all_files(dst) if f.endswith(".webm")]
    assert 1 <= len(done) <= 5, done  # the one that ended and those already handed to the worker (was all 10)
    assert not (dst / "train.csv").exists()


def test_an_unwritable_dst_is_a_data_error_before_any_encoding(tmp_path, capsys):
    src = tmp_path / "src"
    make_clip(str(src / "cls" / "a.mkv"))
    (tmp_path / "file").write_text("not a folder")
    assert prepare_main([str(src), str(tmp_path / "file"), *FAST]) == 5
    err = capsys.readouterr().err
    assert "data error: DST " in err and "cannot be written" in err and "Traceback" not in err


def test_prepare_usage_and_missing_or_empty_sources(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    for src in (tmp_path / "missing", tmp_path / "empty"):
        assert cli.main(["data", "prepare", str(src), "--check"]) == 5
        err = capsys.readouterr().err
        assert err.startswith("maskfeat data prepare: data error:") and str(src) in err and "Traceback" not in err
    with pytest.raises(SystemExit) as e:
        prepare_main([str(tmp_path), "--fps", "-1"])
    assert e.value.code == 2
    with pytest.raises(SystemExit) as e:
        prepare_main(["--help"])
    assert e.value.code == 0
    help_text = capsys.readouterr().out
    assert "SRC/{train,val,test}/<class>/<video>" in help_text and "5 data error" in help_text


@pytest.mark.parametrize("codec", ["vp9", "h264"])
def test_prepare_into_src_or_a_folder_inside_it_is_a_usage_error(tmp_path, capsys, codec):
    """Regression: DST equal to SRC (vp9: a .webm beside each source, the lists in SRC; h264: the
    sources taken for done outputs, "prepared" with nothing encoded) or inside it was accepted."""
    src = tmp_path / "src"
    make_clip(str(src / "c" / "a.mkv"))
    before = all_files(src)
    os.symlink(src, tmp_path / "link")
    for dst in (str(src), str(src) + os.sep, str(src / "prepared"), str(tmp_path / "link")):
        with pytest.raises(SystemExit) as e:
            prepare_main([str(src), dst, "--codec", codec, "--workers", "1"])
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert "SRC" in err and "choose an output folder outside SRC" in err, err
    assert all_files(src) == before  # nothing written
    with pytest.raises(ValueError, match="inside SRC"):  # the library function checks too
        prepare_dataset(str(src), str(src / "out"), codec=codec, progress=False)


def test_cli_unreadable_config_and_missing_checkpoint_exit_2(tmp_path, capsys):
    """Regression: --config naming a folder or a binary file was a traceback (exit 1); a missing
    ``maskfeat eval --checkpoint`` was a "data error" (exit 5) while a missing --resume is exit 2."""
    (tmp_path / "model.pt").write_bytes(b"PK\x03\x04\x80\xff\xfe\x00")
    for config in (tmp_path, tmp_path / "model.pt"):
        assert cli.main(["pretrain", "-c", str(config)]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"maskfeat pretrain: config error: cannot read config file {config}"), err
        assert "Traceback" not in err
    assert cli.main(["eval", "-c", TINY, "--checkpoint", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"maskfeat eval: config error: --checkpoint {tmp_path / 'nope'} not found"), err
    os.makedirs(tmp_path / "run" / "checkpoints" / "step00000001")  # a tag folder with our state, no weights
    open(tmp_path / "run" / "checkpoints" / "step00000001" / "engine_state_r00000.pt", "w").close()
    assert cli.main(["eval", "-c", TINY, "--checkpoint", str(tmp_path / "run" / "checkpoints" / "step00000001")]) == 2
    err = capsys.readouterr().err
    assert "checkpoint error: --checkpoint" in err and "incomplete or damaged" in err and "data error" not in err, err


def test_cli_help_lists_the_exit_codes(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "exit status:" in out and "  5  data error" in out and "  6  out of GPU memory" in out


@pytest.mark.parametrize("case", ["empty_root", "label_not_integer", "label_without_class_name", "corrupt_classes"])
def test_cli_dataset_listing_errors_exit_5(tmp_path, capsys, case):
    """Through the real finetune path (distributed set-up, then the loader): one paragraph, exit 5."""
    root = tmp_path / "root"
    root.mkdir()
    kind = "kinetics"
    if case == "empty_root":
        kind, expect = "folder", "no class sub-folders"
    elif case == "label_not_integer":
        (root / "train.csv").write_text("a.mkv x\n")
        expect = "not an integer"
    elif case == "label_without_class_name":
        (root / "train.csv").write_text("a.mkv 7\n")
        (root / "classes.json").write_text('["a", "b"]')
        expect = "7"
    else:
        (root / "train.csv").write_text("a.mkv 0\n")
        (root / "classes.json").write_text('["a", ')
        expect = ""  # json's message (the wording is json's, not ours)
    code = cli.main(["finetune", "-c", TINY, f"data.dataset={kind}", f"data.root={root}", "finetune.pretrained=",
                     f"train.output_dir={tmp_path / 'run'}"])
    err = capsys.readouterr().err
    assert code == 5, err
    assert "maskfeat finetune: data error:" in err and expect in err and "Traceback" not in err


def test_prepare_reads_the_other_lists_through_trains_classes(tmp_path):
    """train.csv labels {0, 1}, val.csv {0, 2}, no classes.json: fine-tuning refuses val's label 2;
    ``data prepare --check`` passed, and ``prepare`` wrote 3 class names, after which fine-tuning took
    the same data with a warning. Both read val through train's classes now."""
    from engine.data.prepare import _listings

    (tmp_path / "train.csv").write_text("a.mp4 0\nb.mp4 1\n")
    (tmp_path / "val.csv").write_text("a.mp4 0\nc.mp4 2\n")
    with pytest.raises(DataError, match=r"val\.csv:2: label 2 is out of range"):
        _listings(str(tmp_path))
    (tmp_path / "val.csv").write_text("a.mp4 0\nc.mp4 1\n")
    got = _listings(str(tmp_path))
    assert list(got) == ["train", "val"] and got["val"].class_names == got["train"].class_names == ["0", "1"]


def test_is_data_error_keeps_programming_errors(monkeypatch, tmp_path):
    with pytest.raises(ValueError) as e:
        load_dataset("folder", str(tmp_path), "train", (".mkv",))  # empty root: raised in scan_class_folders
    assert cli.is_data_error(e.value)
    assert cli.is_data_error(DataError("x"))
    assert not cli.is_data_error(ValueError("a bug elsewhere"))
    assert not cli.is_data_error(TypeError("a bug"))

    import engine.finetune

    def bug(cfg, resume=None):
        raise ValueError("some bug")

    monkeypatch.setattr(engine.finetune, "run_finetune", bug)
    with pytest.raises(ValueError, match="some bug"):
        cli.main(["finetune", "-c", TINY, f"train.output_dir={tmp_path}"])


def test_cli_paths_usage_and_defaults(monkeypatch, tmp_path, capsys):
    """Relative paths were stored as given: `maskfeat eval --checkpoint RUN` (which reads the run's
    saved config) failed from another folder ("dataset folder my_videos not found"). A usage error
    of a command printed the list of commands; a bare `maskfeat pretrain` said nothing of the
    defaults it started a 300-epoch run with."""
    import engine.pretrain

    seen = {}
    monkeypatch.setattr(engine.pretrain, "run_pretrain", lambda cfg, resume=None: seen.update(cfg=cfg))
    monkeypatch.chdir(tmp_path)
    assert cli.main(["pretrain", "-c", TINY, "data.root=my_videos", "train.output_dir=runs/x"]) == 0
    cfg = seen["cfg"]
    assert cfg.data.root == str(tmp_path / "my_videos") and cfg.train.output_dir == str(tmp_path / "runs" / "x")
    assert "no --config" not in capsys.readouterr().out
    assert cli.main(["pretrain", "train.output_dir=runs/y"]) == 0
    assert "maskfeat pretrain: no --config: the built-in defaults (mvitv2_tiny on the demo clips" in capsys.readouterr().out
    import torch

    import engine.finetune

    monkeypatch.setattr(engine.finetune, "run_eval", lambda cfg, checkpoint, save_predictions=False: {})
    torch.save({"model_state": {}}, str(tmp_path / "official.pyth"))
    assert cli.main(["eval", "--checkpoint", str(tmp_path / "official.pyth")]) == 0
    assert "carries no config (an official .pyth, a plain .pt): the built-in defaults" in capsys.readouterr().out
    cli.main(["eval", "--checkpoint", str(tmp_path / "nope")])  # a mistyped path: run_eval's error, no config notice
    assert "carries no config" not in capsys.readouterr().out
    with pytest.raises(SystemExit):
        cli.main(["eval"])
    out, err = capsys.readouterr()
    assert err.startswith("usage: maskfeat eval") and "--checkpoint is required" in err
    assert out == ""  # (it first said "None carries no config")
    with pytest.raises(SystemExit):
        cli.main(["pretrain", "-c", TINY, "optim.lr"])
    assert capsys.readouterr().err.startswith("usage: maskfeat pretrain")


@pytest.mark.parametrize("how, code, why", [("ctrl-c", 130, "interrupted"), ("sigterm", 143, "terminated (SIGTERM)")])
def test_interrupted_run_names_the_checkpoint_to_resume_from(monkeypatch, tmp_path, capsys, how, code, why):
    import signal

    import engine.pretrain

    monkeypatch.setattr("engine.checkpoint.find_latest", lambda out, resumable=False: "step00000004")

    def run(cfg, resume=None):
        if how == "ctrl-c":
            raise KeyboardInterrupt
        os.kill(os.getpid(), signal.SIGTERM)  # the handler cli.main installs raises in this thread

    monkeypatch.setattr(engine.pretrain, "run_pretrain", run)
    before = signal.getsignal(signal.SIGTERM)
    assert cli.main(["pretrain", "-c", TINY, f"train.output_dir={tmp_path / 'run'}"]) == code
    err = capsys.readouterr().err
    assert f"maskfeat pretrain: {why}; the last complete checkpoint is step00000004" in err
    assert "--resume auto" in err and "Traceback" not in err
    assert signal.getsignal(signal.SIGTERM) is before  # restored


def test_crf_reaches_both_encoders(tmp_path):
    """encode_video's crf was ignored for H.264 (23 hard-coded): a higher crf makes a smaller file."""
    src = str(tmp_path / "noise.mkv")
    with av.open(src, "w", format="matroska") as c:
        s = c.add_stream("mjpeg", rate=25)
        s.width, s.height, s.pix_fmt = 64, 64, "yuvj420p"
        rng = np.random.default_rng(0)
        for i in range(4):
            f = av.VideoFrame.from_ndarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8), format="rgb24")
            for p in s.encode(f):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    for codec, ext in (("h264", ".mp4"), ("vp9", ".webm")):
        sizes = []
        for crf in (10, 45):
            out = str(tmp_path / f"{codec}{crf}{ext}")
            encode_video(src, out, codec=codec, short_side=64, crf=crf)
            sizes.append(os.path.getsize(out))
        assert sizes[0] > 1.5 * sizes[1], (codec, sizes)


def test_check_with_a_recipe_counts_clip_frames_by_each_files_rate(tmp_path, capsys):
    """`--min-frames` counts raw frames: 61 flagged a 12 fps file training accepts and passed a 60 fps
    one training refuses (a 16x4 clip at 30 fps spans 121 frames of it). `--config` takes the
    recipe's clip and the file's own rate, as training does."""
    slow = make_clip(str(tmp_path / "src" / "a" / "slow.mkv"), n=6, pts_ms=[100 * i for i in range(6)], rate=10)
    fast = make_clip(str(tmp_path / "src" / "b" / "fast.mkv"), n=6, pts_ms=[round(i * 1000 / 60) for i in range(6)],
                     rate=60)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("data:\n  num_frames: 4\n  sampling_rate: 2\n  target_fps: 30\n  short_videos: bad\n")
    assert prepare_main([str(tmp_path / "src"), "--check", "--min-frames", "7"]) == 1
    out = capsys.readouterr().out
    assert f"{slow}: too_short" in out and f"{fast}: too_short" in out
    assert prepare_main([str(tmp_path / "src"), "--check", "--config", str(recipe)]) == 1  # 3 of 10 fps, 13 of 60
    out = capsys.readouterr().out
    assert f"{fast}: too_short (6 frames, one clip needs 13)" in out and slow not in out and "short:" not in out
    # a recipe that pads (the default, as SlowFast) trains on the short file: named, not bad
    recipe.write_text("data:\n  num_frames: 4\n  sampling_rate: 2\n  target_fps: 30\n")
    assert prepare_main([str(tmp_path / "src"), "--check", "--config", str(recipe)]) == 0
    out = capsys.readouterr().out
    assert "too_short" not in out and f"  short: {fast} (6 frames, one clip spans 13)" in out and slow not in out
    assert "note: 1 file(s) shorter than one clip of the recipe: training repeats their last frame" in out
    # no val split: the check passed, then fine-tuning refused the same data; it says so now
    assert "note: no val split (only train): fine-tuning evaluates finetune.eval_split" in out
    make_clip(str(tmp_path / "split" / "train" / "a" / "x.mkv"), n=6)
    make_clip(str(tmp_path / "split" / "val" / "a" / "y.mkv"), n=6)
    assert prepare_main([str(tmp_path / "split"), "--check"]) == 0
    assert "no val split" not in capsys.readouterr().out
    # short_videos=bad makes training's short files bad, not val's (evaluation keeps them, padded)
    bad = tmp_path / "bad.yaml"
    bad.write_text("data:\n  num_frames: 8\n  sampling_rate: 2\n  target_fps: 25\n  short_videos: bad\n")
    assert prepare_main([str(tmp_path / "split"), "--check", "--config", str(bad)]) == 1
    out = capsys.readouterr().out
    assert "x.mkv: too_short (6 frames, one clip needs 15)" in out and "y.mkv" not in out, out
    with pytest.raises(SystemExit):
        prepare_main([str(tmp_path / "src"), "--check", "--config", str(recipe), "--min-frames", "7"])
