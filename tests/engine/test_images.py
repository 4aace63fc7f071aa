"""engine/data/images.py on messy image folders: files that only DALI's decoder refuses (truncated
JPEG, GIF or text named .jpg, a PNG whose compressed data is corrupt), under on_bad_file=error
(ImageDecodeError naming the file, a data error: exit 5) and skip (deterministic replacements,
reported once); the feeder's image wording; validation failures warned and agreed across ranks;
augmentation settings not applied to images; the evaluation resize + centre crop against
torchvision's arithmetic; PNG EXIF orientation read without a decode. Images are tiny (40x30)."""
from __future__ import annotations

import io
import logging
import math
import os
import struct
import warnings
import zlib

import numpy as np
import pytest
import torch

pytest.importorskip("nvidia.dali")
Image = pytest.importorskip("PIL.Image")

from engine.data import DataConfig, DataError, build_loader  # noqa: E402
from engine.data.errors import ImageDecodeError  # noqa: E402
from engine.data.images import centre_crop_box, image_size  # noqa: E402
from engine.data.pipeline import Feeder  # noqa: E402
from engine.data.sampler import ClipSpec  # noqa: E402


def _jpeg(rng: np.random.Generator, w: int = 40, h: int = 30) -> bytes:
    b = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(b, "JPEG", quality=90)
    return b.getvalue()


def _bad_png_data(rng: np.random.Generator) -> bytes:
    """A PNG whose chunks (lengths, CRCs, IEND) are intact but whose zlib stream is corrupt: it
    passes the worker's cheap check and fails in DALI's decoder."""
    b = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (30, 40, 3), dtype=np.uint8)).save(b, "PNG")
    d, i = bytearray(b.getvalue()), 8
    while True:
        n = struct.unpack(">I", d[i:i + 4])[0]
        if d[i + 4:i + 8] == b"IDAT":
            d[i + 8 + n // 2:i + 8 + n // 2 + 64] = bytes(64)
            d[i + 8 + n:i + 12 + n] = struct.pack(">I", zlib.crc32(bytes(d[i + 4:i + 8 + n])))
            return bytes(d)
        i += 12 + n


def _bad_data(kind: str, rng: np.random.Generator) -> bytes:
    if kind == "truncated":  # cut in the image data, after the headers
        data = _jpeg(rng)
        return data[: len(data) * 2 // 3]
    if kind == "gif":
        b = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (30, 40, 3), dtype=np.uint8)).save(b, "GIF")
        return b.getvalue()
    if kind == "text":
        return b"this is not an image\n" * 10
    if kind == "png_idat":
        return _bad_png_data(rng)
    if kind == "tiff_la":  # grey + alpha: DALI decoded it wrong (alpha as green), without an error
        b = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (30, 40, 2), dtype=np.uint8), "LA").save(b, "TIFF")
        return b.getvalue()
    raise ValueError(kind)


def make_folder(root, bad: str | None = None, n: int = 3) -> str | None:
    """root/train/{a,b}/{0..n-1}.jpg (40x30 noise, seeded: the same for every root) and, with ``bad``,
    root/train/a/bad.jpg of that kind; returns the bad file's path."""
    rng = np.random.default_rng(0)
    for cls in ("a", "b"):
        os.makedirs(root / "train" / cls, exist_ok=True)
        for j in range(n):
            (root / "train" / cls / f"{j}.jpg").write_bytes(_jpeg(rng))
    if bad is None:
        return None
    path = root / "train" / "a" / "bad.jpg"
    path.write_bytes(_bad_data(bad, np.random.default_rng(1)))
    return str(path)


def cfg_for(root, **kw) -> DataConfig:
    base = dict(root=str(root), dataset="image_folder", crop_size=16, batch_size=2, num_threads=1, prefetch=1,
                cache_dir=str(root / ".c"), mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    return DataConfig(**{**base, **kw})


def _batches(loader) -> list[dict]:
    return [{k: v.clone() for k, v in b.items()} for b in loader]


# ---- 1: files only DALI's decoder refuses ---------------------------------------------------------

@pytest.mark.parametrize("kind", ["truncated", "gif", "text", "png_idat", "tiff_la"])
def test_undecodable_image_is_a_data_error_naming_it(tmp_path, kind):
    """Training and evaluation; png_idat passes the worker's check and fails inside DALI; a grey+alpha
    TIFF, which DALI misreads without an error, is refused by the worker's check."""
    from engine.cli import is_data_error

    bad = make_folder(tmp_path, kind)
    for mode in ("pretrain", "test"):
        loader = build_loader(cfg_for(tmp_path), "train", mode=mode)
        assert bad in loader.dataset.paths  # validation checks existence and size only
        with pytest.raises(ImageDecodeError) as e:
            for _ in loader:
                pass
        msg = str(e.value)
        assert e.value.path == bad and bad in msg and isinstance(e.value, DataError) and is_data_error(e.value)
        assert "data.on_bad_file=skip" in msg and "Remove" in msg
        assert "frames" not in msg and "prepare" not in msg and "clip" not in msg  # image wording
        assert loader.decode_failures == [bad]


@pytest.mark.parametrize("kind", ["truncated", "png_idat"])
def test_undecodable_image_skip_replaces_it_deterministically(tmp_path, caplog, kind):
    """Under skip the bad image is replaced by one drawn from (seed, epoch, position, attempt),
    valid=False, the number of batches unchanged, reported once; a fresh or resumed loader gives the
    same batches, and a file only DALI refuses (png_idat) is replaced exactly as one the worker's check
    catches (truncated)."""
    bad = make_folder(tmp_path, kind)
    cfg = cfg_for(tmp_path, on_bad_file="skip", clips_per_epoch=14)
    loader = build_loader(cfg, "train", mode="pretrain")
    bad_index = loader.dataset.paths.index(bad)
    from engine.data.pipeline import UNUSED_OUTPUTS_FILTER

    with caplog.at_level(logging.WARNING, logger="engine.data.images"), warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        warnings.filterwarnings(**UNUSED_OUTPUTS_FILTER)  # (installed once at import: "always" above overrides it)
        ref = _batches(loader)  # epoch 0
        again = _batches(loader)  # epoch 1: the bad file is met again, not reported again
    assert not [x for x in w if "not used" in str(x.message)]  # DALI's unused-outputs warning is silenced
    assert len(ref) == len(again) == len(loader) == 7
    assert loader.decode_failures == [bad]
    assert sum(bad in r.getMessage() for r in caplog.records) == 1
    planned = [s.index for b in loader.plan(0) for s in b]
    assert planned.count(bad_index) >= 1
    got = torch.cat([b["index"] for b in ref]).tolist()
    valid = torch.cat([b["valid"] for b in ref]).tolist()
    assert bad_index not in got and valid.count(False) == planned.count(bad_index)
    fresh = build_loader(cfg, "train", mode="pretrain")
    resumed = build_loader(cfg, "train", mode="pretrain")
    resumed.load_state_dict({"epoch": 0, "batches_consumed": 3, "seed": cfg.seed, "world_size": 1})
    for a, b in zip(ref, _batches(fresh)):
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["index"], b["index"])
    for a, b in zip(ref[3:], _batches(resumed)):
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["valid"], b["valid"])
    if kind == "png_idat":  # the same folder with a file the worker's check catches instead
        other = tmp_path / "other"
        make_folder(other, "truncated")
        caught = _batches(build_loader(cfg_for(other, on_bad_file="skip", clips_per_epoch=14), "train"))
        for a, b in zip(ref, caught):
            assert torch.equal(a["image"], b["image"]) and torch.equal(a["valid"], b["valid"])


def test_feeder_image_wording(tmp_path):
    """media="image": ImageDecodeError without frames or the prepare hint; with replace (skip set)
    the give-up message does not suggest setting skip; the video default is unchanged."""
    p = tmp_path / "x.jpg"
    p.write_bytes(b"junk")
    spec = ClipSpec(0, 0, np.zeros(1, np.int32), (0.0, 0.0, 1.0, 1.0), False, None, 0, True, position=0)

    def fail(s, data):
        raise ValueError("bad image")

    f = Feeder([[spec]], [str(p)], "bytes", 0, 1, 1, finish=fail, media="image")
    with pytest.raises(ImageDecodeError) as e:
        f()
    f.close()
    assert "frames" not in str(e.value) and "prepare" not in str(e.value) and "data.on_bad_file=skip" in str(e.value)
    f = Feeder([[spec]], [str(p)], "bytes", 0, 1, 1, finish=fail, media="image", replace=lambda s, a: s)
    with pytest.raises(ImageDecodeError) as e:
        f()
    f.close()
    assert "replacement images" in str(e.value) and "on_bad_file" not in str(e.value)
    f = Feeder([[spec]], [str(p)], "bytes", 0, 1, 1, finish=fail)
    with pytest.raises(DataError) as e:
        f()
    f.close()
    assert not isinstance(e.value, ImageDecodeError) and "decoding frames 0..0 failed" in str(e.value)
    with pytest.raises(ValueError, match="media must be 'video' or 'image'"):
        Feeder([], [], "bytes", 0, 1, 1, media="audio")


# ---- 3, 4: validation and ignored settings -----------------------------------------------------------

def test_validation_skip_warns_and_applies_other_ranks_bad_files(tmp_path, caplog, monkeypatch):
    import engine.data.loader as loader_mod
    from engine.data.probe import BadDatasetError, BadFile

    make_folder(tmp_path)
    (tmp_path / "train" / "a" / "zero.jpg").write_bytes(b"")
    other = str(tmp_path / "train" / "b" / "1.jpg")  # unreadable on "another rank"
    calls = []

    def agree(bad):
        calls.append(list(bad))
        return bad + [BadFile(other, "unreadable", "no such file (on rank 1)")]

    monkeypatch.setattr(loader_mod, "agree_across_ranks", agree)
    with caplog.at_level(logging.WARNING, logger="engine.data.images"):
        loader = build_loader(cfg_for(tmp_path, on_bad_file="skip"), "train")
    assert len(calls) == 1 and [b.reason for b in calls[0]] == ["empty"]
    assert other not in loader.dataset.paths and len(loader.dataset) == 5
    msgs = [r.getMessage() for r in caplog.records if "left out" in r.getMessage()]
    assert len(msgs) == 1 and "zero.jpg" in msgs[0] and other in msgs[0]
    with pytest.raises(BadDatasetError):
        build_loader(cfg_for(tmp_path), "train")


def test_every_format_dali_decodes_is_listed_and_loads(tmp_path):
    """TIFF and PNM images were left out of an image folder silently (the listing knew only JPEG,
    PNG, BMP and WebP, although the loader's checks accept them)."""
    a = np.random.default_rng(3).integers(0, 255, (24, 20, 3), dtype=np.uint8)
    os.makedirs(tmp_path / "train" / "a")
    names = ["x.jpg", "y.tif", "z.TIFF", "w.ppm", "v.png"]
    for n in names:
        Image.fromarray(a).save(tmp_path / "train" / "a" / n)
    Image.fromarray(a[..., 0]).save(tmp_path / "train" / "a" / "g.pgm")
    loader = build_loader(cfg_for(tmp_path, batch_size=6, mean=(0.0, 0.0, 0.0), std=(1 / 255, 1 / 255, 1 / 255)),
                          "train", mode="test")
    assert sorted(os.path.basename(p) for p in loader.dataset.paths) == sorted(names + ["g.pgm"])
    out = next(iter(loader))["image"]
    assert out.shape == (6, 3, 16, 16)
    assert len(build_loader(cfg_for(tmp_path, batch_size=1, eval_batch_size=6), "train", mode="test")) == 1
    colour = [i for i, p in enumerate(loader.dataset.paths) if not p.endswith((".jpg", ".pgm"))]
    assert len(colour) == 4
    for i in colour:  # the lossless colour files decode to the same pixels
        assert torch.allclose(out[i], out[colour[0]], atol=1.0), loader.dataset.paths[i]
    grey = out[[p.endswith(".pgm") for p in loader.dataset.paths].index(True)]
    assert torch.equal(grey[0], grey[1]) and torch.allclose(grey[0], out[colour[0]][0], atol=1.0)


def test_a_state_outside_the_epoch_is_refused(tmp_path):
    """As the video loader: 99 moved silently to the next epoch, -3 gave the epoch's last 3 batches
    and then replayed it from batch 0."""
    make_folder(tmp_path)
    loader = build_loader(cfg_for(tmp_path), "train")
    state = loader.state_dict()
    for bad in (99, -3):
        with pytest.raises(ValueError, match=rf"batches_consumed={bad} outside \[0, {len(loader)}\]"):
            loader.load_state_dict({**state, "batches_consumed": bad})
    loader.load_state_dict({**state, "batches_consumed": len(loader)})  # a finished epoch is a position


def test_another_world_size_restarts_the_epoch_with_a_warning_and_plans_lazily(tmp_path, caplog, monkeypatch):
    """A state of another world size restarts the epoch, now with the video loader's warning (it was
    silent); the epoch's batches are planned when read, not all up front (3 s per epoch start at
    ImageNet scale)."""
    from engine.data import images

    make_folder(tmp_path)
    loader = build_loader(cfg_for(tmp_path), "train", mode="finetune")
    state = {**loader.state_dict(), "epoch": 2, "batches_consumed": 1}
    with caplog.at_level(logging.WARNING, logger="engine.data.loader"):
        loader.load_state_dict({**state, "world_size": 4})
    assert (loader.epoch, loader.batches_consumed) == (2, 0)
    assert "restarting epoch 2 at batch 0" in caplog.text
    calls = []
    spec = images.ImageLoader._spec
    monkeypatch.setattr(images.ImageLoader, "_spec", lambda self, *a, **k: (calls.append(a), spec(self, *a, **k))[1])
    plan = loader.plan(0)
    assert len(plan) == len(loader) > 1 and not calls
    first = plan[1]
    assert len(calls) == len(first) and [s.position for s in first] == [s.position for s in loader.plan(0)[1]]


def test_fine_tuning_applies_rand_augment_and_random_erasing_to_images(tmp_path, caplog):
    """timm's ImageNet training transform: crop, flip, RandAugment, normalise, random erasing (the
    official in1k recipes set rand-m9-mstd0.5-inc1 and erasing 0.25). Images used to get crop and
    flip only. Checked per sample against the same loader with each augmentation off: an image
    changes exactly when its draws apply an op, and erasing changes exactly its box, with N(0, 1)
    noise; the batches repeat for the same seed. Only repeated augmentation is still not applied."""
    make_folder(tmp_path, n=8)
    common = dict(crop_size=32, batch_size=4)

    def run(**kw):
        loader = build_loader(cfg_for(tmp_path, **{**common, **kw}), "train", mode="finetune")
        return loader, _batches(loader), [s for chunk in loader.plan(0) for s in chunk]

    with caplog.at_level(logging.WARNING, logger="engine.data.images"):
        _, plain, plain_specs = run(rand_augment=False, random_erasing=0.0, repeated_aug=1)
        assert not [r for r in caplog.records if "does not apply" in r.getMessage()]
        _, ra, ra_specs = run(rand_augment=True, rand_augment_m=9.0, random_erasing=0.0, repeated_aug=2)
        msgs = [r.getMessage() for r in caplog.records if "does not apply" in r.getMessage()]
        assert len(msgs) == 1 and "data.repeated_aug=2" in msgs[0]
    _, er, er_specs = run(rand_augment=False, random_erasing=1.0, repeated_aug=1)
    _, ra_again, _ = run(rand_augment=True, rand_augment_m=9.0, random_erasing=0.0, repeated_aug=1)
    assert all(s.rand_aug is None and s.erase is None for s in plain_specs)
    x0 = torch.cat([b["image"] for b in plain])
    x_ra = torch.cat([b["image"] for b in ra])
    x_er = torch.cat([b["image"] for b in er])
    assert torch.equal(x_ra, torch.cat([b["image"] for b in ra_again]))  # a function of (seed, epoch, position)
    assert [s.flip for s in ra_specs] == [s.flip for s in plain_specs] == [s.flip for s in er_specs]
    applied = [bool(s.rand_aug[:, 1].any()) for s in ra_specs]
    changed = [not torch.equal(a, b) for a, b in zip(x_ra, x0)]
    assert any(applied) and not all(applied), applied  # 16 images: both kinds occur
    assert changed == applied
    for img, ref, s in zip(x_er, x0, er_specs):  # erasing at probability 1: every image has a box
        top, left, h, w = s.erase
        inside = torch.zeros_like(img, dtype=torch.bool)
        inside[:, top:top + h, left:left + w] = True
        assert torch.equal(img[~inside], ref[~inside])
        assert not torch.equal(img[inside], ref[inside])
    noise = torch.cat([img[:, s.erase[0]:s.erase[0] + s.erase[2], s.erase[1]:s.erase[1] + s.erase[3]].flatten()
                       for img, s in zip(x_er, er_specs)])
    assert abs(noise.mean()) < 0.15 and abs(noise.std() - 1) < 0.15, (noise.mean(), noise.std())
    pre = build_loader(cfg_for(tmp_path, **common), "train", mode="pretrain")
    assert all(s.rand_aug is None and s.erase is None for c in pre.plan(0) for s in c)  # pre-training: neither


# ---- 5: evaluation resize + centre crop ---------------------------------------------------------------

def _torchvision_resize_crop(h: int, w: int, size: int, crop: int) -> tuple[int, int, int, int]:
    """torchvision's Resize(size) output (h, w) and CenterCrop(crop) corner (top, left), as its
    functional code computes them (_compute_resized_output_size, center_crop)."""
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = size, int(size * long / short)
    nw, nh = (new_short, new_long) if w <= h else (new_long, new_short)
    return nh, nw, int(round((nh - crop) / 2.0)), int(round((nw - crop) / 2.0))


def test_eval_crop_matches_torchvision_resize_and_centre_crop(tmp_path):
    """A 400x300 image, crop 224: the short side is int(224 * 256 / 224) = 256 at fraction 0.875 and
    int(224 / 0.8) = 280 at 0.8; the long side 341 / 373 leaves a .5 margin that torchvision rounds
    half to even (58, 74) and DALI's own centre crop rounded up. Compared with PIL's bicubic resize
    and torchvision's crop window, and against the window one pixel to the right."""
    H, W, crop = 300, 400, 224
    yy, xx = np.mgrid[0:H, 0:W]
    a = np.stack([127 + 100 * np.sin(xx / 3.0), 127 + 100 * np.sin(yy / 3.0),
                  127 + 100 * np.sin((xx + yy) / 5.0)], -1).astype(np.uint8)
    os.makedirs(tmp_path / "val" / "a")
    Image.fromarray(a).save(tmp_path / "val" / "a" / "x.png")
    assert math.floor(384 / 0.875) == int(384 * 256 / 224) == 438  # the official size at crop 384
    for fraction, margin in ((0.875, 58), (0.8, 74)):
        size = int(crop * 256 / 224) if fraction == 0.875 else int(crop / fraction)
        nh, nw, top, left = _torchvision_resize_crop(H, W, size, crop)
        assert left == margin and (nw - crop) % 2 == 1
        box = centre_crop_box(H, W, crop, fraction)
        assert box == (top / nh, left / nw, (top + crop) / nh, (left + crop) / nw)
        cfg = cfg_for(tmp_path, crop_size=crop, batch_size=1, test_crop_fraction=fraction,
                      mean=(0.0, 0.0, 0.0), std=(1 / 255, 1 / 255, 1 / 255))
        out = next(iter(build_loader(cfg, "val", mode="test")))["image"][0].permute(1, 2, 0).numpy()  # (H, W, C)
        ref = np.asarray(Image.fromarray(a).resize((nw, nh), Image.BICUBIC), np.float32)
        err = np.abs(out - ref[top:top + crop, left:left + crop]).mean()
        shifted = np.abs(out - ref[top:top + crop, left + 1:left + 1 + crop]).mean()
        assert err < 1.0 and shifted > 5.0, (fraction, err, shifted)


# ---- 7: EXIF orientation without a decode -------------------------------------------------------------

def test_png_exif_orientation_without_decoding(tmp_path, monkeypatch):
    """An eXIf chunk after the image data (Pillow's header parse does not see it; its getexif then
    decoded the whole PNG): DALI turns the image, image_size reads it by walking the chunks."""
    from PIL import ImageFile

    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (20, 50, 3), dtype=np.uint8))
    exif = img.getexif()
    exif[0x0112] = 6
    b = io.BytesIO()
    img.save(b, "PNG", exif=exif.tobytes())
    d, chunks, i = b.getvalue(), [], 8
    while i < len(d):
        n = struct.unpack(">I", d[i:i + 4])[0]
        chunks.append(d[i:i + 12 + n])
        i += 12 + n
    ex = [c for c in chunks if c[4:8] == b"eXIf"]
    rest = [c for c in chunks if c[4:8] != b"eXIf"]
    assert len(ex) == 1 and rest[-1][4:8] == b"IEND"
    late = np.frombuffer(d[:8] + b"".join(rest[:-1]) + ex[0] + rest[-1], np.uint8)

    def no_decode(self):
        raise AssertionError("image_size decoded the image")

    with monkeypatch.context() as m:
        m.setattr(ImageFile.ImageFile, "load", no_decode)
        assert image_size(late) == (50, 20) == image_size(late, check=True)
        assert image_size(np.frombuffer(d, np.uint8)) == (50, 20)
    import nvidia.dali.fn as fn
    import nvidia.dali.types as types
    from nvidia.dali import pipeline_def

    @pipeline_def(batch_size=1, num_threads=1, device_id=None)
    def graph():
        return fn.decoders.image(fn.external_source(source=lambda: [late], batch=True), device="cpu",
                                 output_type=types.RGB)

    pipe = graph()
    pipe.build()
    assert pipe.run()[0].as_array().shape == (1, 50, 20, 3)  # DALI applies the late eXIf orientation too


def _dali_shape(data: bytes):
    """(H, W) DALI's CPU image decoder gives for ``data``, or None where it fails."""
    from engine.data.images import dali_decode_size

    try:
        return dali_decode_size(np.frombuffer(data, np.uint8))
    except RuntimeError:
        return None


def _ours(data: bytes):
    try:
        return image_size(np.frombuffer(data, np.uint8), check=True)
    except (ValueError, OSError):
        return None


def test_orientation_and_png_checks_agree_with_dali():
    """Cases where the cheap checks disagreed with DALI's decoder: an XMP-only orientation (DALI
    reads EXIF only; Pillow's getexif fell back to XMP), a TIFF with orientation 6 (Pillow already
    reports it turned: it was turned twice), and PNG ancillary chunks with a bad CRC (libpng warns
    and decodes; the check refused them, Pillow's header parse too). A bad IDAT CRC stays refused."""
    from PIL import Image

    img = Image.fromarray(np.zeros((30, 40, 3), np.uint8))
    buf = io.BytesIO()
    xmp = (b'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
           b'<rdf:Description xmlns:tiff="http://ns.adobe.com/tiff/1.0/" tiff:Orientation="6"/></rdf:RDF></x:xmpmeta>')
    img.save(buf, "JPEG", xmp=xmp)
    tif = io.BytesIO()
    img.save(tif, "TIFF", tiffinfo={0x0112: 6})
    plain = io.BytesIO()
    img.save(plain, "PNG")
    png = plain.getvalue()

    def chunk(kind: bytes, body: bytes, crc: int | None = None) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) if crc is None else crc)

    ihdr_end = 8 + 25
    iend = png.rindex(b"IEND") - 4
    bad_before = png[:ihdr_end] + chunk(b"tEXt", b"a\x00bcd", crc=0) + png[ihdr_end:]
    bad_after = png[:iend] + chunk(b"tEXt", b"a\x00bcd", crc=0) + png[iend:]
    idat = png.index(b"IDAT") - 4
    bad_idat = png[:idat + 8 + int.from_bytes(png[idat:idat + 4], "big")] + b"\0\0\0\0" + png[idat + 12 + int.from_bytes(png[idat:idat + 4], "big"):]
    want = {"xmp.jpg": (30, 40), "orient6.tif": (40, 30), "bad_before.png": (30, 40), "bad_after.png": (30, 40),
            "bad_idat.png": None}  # (both helpers give None on a failure: equal Nones would pass unpinned)
    for name, data in (("xmp.jpg", buf.getvalue()), ("orient6.tif", tif.getvalue()), ("bad_before.png", bad_before),
                       ("bad_after.png", bad_after), ("bad_idat.png", bad_idat)):
        assert _ours(data) == _dali_shape(data) == want[name], name


def _exif(kind: int, count: int, value: bytes) -> bytes:
    """An EXIF block (``Exif\\0\\0`` + little-endian TIFF) holding only an Orientation tag of TIFF type
    ``kind`` (1 BYTE, 2 ASCII, 3 SHORT, 7 UNDEFINED)."""
    tiff = (b"II*\x00" + struct.pack("<IH", 8, 1) + struct.pack("<HHI", 0x0112, kind, count) + value.ljust(4, b"\0")
            + struct.pack("<I", 0))
    return b"Exif\x00\x00" + tiff


def test_exif_orientation_is_read_as_dali_reads_it():
    """The Orientation tag as DALI reads it: a BYTE/UNDEFINED tag (Pillow gives bytes) made int()
    refuse a file DALI decodes turned; an ASCII "6" turned the planned crop of an image DALI leaves as
    stored (a portrait box on a landscape image), an ASCII "a" refused it; of two EXIF blocks in a
    JPEG, DALI applies the last, the plan took Pillow's first."""
    from PIL import Image

    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (30, 50, 3), dtype=np.uint8))

    def jpeg(exif: bytes = b"") -> bytes:
        buf = io.BytesIO()
        img.save(buf, "JPEG", **({"exif": exif} if exif else {}))
        return buf.getvalue()

    cases = {"byte 6": (jpeg(_exif(1, 1, b"\x06")), (50, 30)), "undefined 6": (jpeg(_exif(7, 1, b"\x06")), (50, 30)),
             "short 6": (jpeg(_exif(3, 1, b"\x06\x00")), (50, 30)), "ascii 6": (jpeg(_exif(2, 2, b"6\0")), (30, 50)),
             "ascii a": (jpeg(_exif(2, 2, b"a\0")), (30, 50))}
    plain = jpeg()

    def app1(orientation: int) -> bytes:
        payload = _exif(3, 1, struct.pack("<H", orientation))
        return b"\xff\xe1" + struct.pack(">H", len(payload) + 2) + payload

    cases["two blocks 1, 6"] = (plain[:2] + app1(1) + app1(6) + plain[2:], (50, 30))
    cases["two blocks 6, 1"] = (plain[:2] + app1(6) + app1(1) + plain[2:], (30, 50))
    # a later block without the tag, or broken, does not reset the orientation
    make_only = b"Exif\x00\x00II*\x00" + struct.pack("<IH", 8, 1) + struct.pack("<HHI", 0x010F, 2, 4) + b"abc\0" + b"\0" * 4
    for name, later in (("no tag", make_only), ("broken", b"Exif\x00\x00garbage!!")):
        block = b"\xff\xe1" + struct.pack(">H", len(later) + 2) + later
        cases[f"6, then a block with {name}"] = (plain[:2] + app1(6) + block + plain[2:], (50, 30))
    ascii_one = _exif(2, 2, b"1\0")  # a tag DALI cannot use: the image as stored, whatever came before
    cases["6, then an ASCII tag"] = (plain[:2] + app1(6) + b"\xff\xe1" + struct.pack(">H", len(ascii_one) + 2)
                                     + ascii_one + plain[2:], (30, 50))
    for name, (data, want) in cases.items():
        assert _ours(data) == want, name
        assert _dali_shape(data) == want, name  # what DALI's decoder does, measured here


def test_a_png_with_two_exif_chunks_is_refused():
    """DALI's CPU decoder segfaults on a PNG whose second eXIf chunk undoes a turning first one: the
    whole process died under either on_bad_file, no file named. The check refuses any second eXIf
    (DALI itself is not asked here: it would crash the test run)."""
    from PIL import Image

    from engine.data.images import _png_exif

    plain = io.BytesIO()
    Image.fromarray(np.zeros((30, 50, 3), np.uint8)).save(plain, "PNG")
    png = plain.getvalue()

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    def exif_chunk(orientation: int) -> bytes:
        return chunk(b"eXIf", _exif(3, 1, struct.pack("<H", orientation))[6:])

    one = png[:33] + exif_chunk(6) + png[33:]
    assert _ours(one) == (50, 30)
    two = png[:33] + exif_chunk(6) + exif_chunk(1) + png[33:]
    with pytest.raises(ValueError, match="two eXIf chunks"):
        image_size(np.frombuffer(two, np.uint8), check=True)
    assert _png_exif(two, check=False) == _exif(3, 1, struct.pack("<H", 1))[6:]  # the last, as DALI applies


def test_image_folders_list_jfif_and_count_formats_dali_cannot_read(tmp_path, caplog):
    """.jfif/.jpe JPEGs were left out of an image folder, and GIF/HEIC/AVIF files too, without a word."""
    from PIL import Image

    from engine.data.datasets import load_dataset

    for cls, name in (("a", "x.jfif"), ("a", "y.jpe"), ("a", "z.png"), ("b", "w.jpg")):
        os.makedirs(tmp_path / "train" / cls, exist_ok=True)
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "train" / cls / name, "JPEG" if "j" in name else "PNG")
    for name in ("v.gif", "u.heic"):
        (tmp_path / "train" / "b" / name).write_bytes(b"\0")
    with caplog.at_level(logging.WARNING):
        ds = load_dataset("image_folder", str(tmp_path), "train", ())
    assert sorted(os.path.basename(p) for p in ds.paths) == ["w.jpg", "x.jfif", "y.jpe", "z.png"]
    assert "2 image file(s) left out for their extension (.gif 1, .heic 1): DALI's image decoder" in caplog.text


def test_dali_reason_names_the_decoder_failure():
    from engine.data.images import _dali_reason

    err = RuntimeError("Critical error in pipeline:\nError in CPU operator `nvidia.dali.fn.decoders.image`,\n"
                       "which was used in the pipeline definition with the following traceback:\n\n  File x\n\n"
                       "encountered:\n\nnvImageCodec failure: '#17'\nC++ context: [...]")
    assert _dali_reason(err) == "nvImageCodec failure: '#17'"


@pytest.mark.parametrize("mode", ["error", "skip"])
def test_a_file_only_pillow_rejects_is_not_blamed_for_dalis_failure(tmp_path, mode):
    """Pillow is stricter than DALI in places (a PNG text chunk with a bad CRC: libpng warns and
    decodes). When another image in flight failed in DALI, the Pillow-rejected one was named first
    (``error``) or excluded as undecodable (``skip``); only files DALI fails on alone are culprits."""
    from engine.data.images import dali_problem, pillow_problem

    rng = np.random.default_rng(0)
    for c in "ab":
        os.makedirs(tmp_path / "train" / c)
    b = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (30, 40, 3), dtype=np.uint8)).save(b, "PNG")
    body = b"tEXt" + b"Comment\x00hello"
    chunk = struct.pack(">I", len(body) - 4) + body + struct.pack(">I", (zlib.crc32(body) ^ 1) & 0xFFFFFFFF)
    strict = tmp_path / "train" / "a" / "0_strict.png"
    strict.write_bytes(b.getvalue()[:33] + chunk + b.getvalue()[33:])  # after IHDR
    broken = tmp_path / "train" / "b" / "0_broken.png"
    broken.write_bytes(_bad_png_data(rng))
    for c in "ab":
        (tmp_path / "train" / c / "1.jpg").write_bytes(_jpeg(rng))
    assert pillow_problem(str(strict)) is not None and dali_problem(str(strict)) is None
    assert dali_problem(str(broken)) is not None
    loader = build_loader(cfg_for(tmp_path, batch_size=4, on_bad_file=mode), "train", mode="test")
    if mode == "error":
        with pytest.raises(ImageDecodeError) as e:
            _batches(loader)
        assert e.value.path == str(broken) and str(strict) not in str(e.value).split(" cannot be decoded")[0]
    else:
        batches = _batches(loader)
        assert loader.decode_failures == [str(broken)]
        assert sum(bool(v) for b in batches for v in b["valid"]) == 3  # the strict PNG is kept


def test_feeder_close_drops_its_queued_work(tmp_path):
    """close() empties the queue and the plan at once: DALI's graph keeps a feeder alive until the
    collector runs, and with it depth x batch decoded images; a call after close ends the data."""
    p = tmp_path / "x.jpg"
    p.write_bytes(_jpeg(np.random.default_rng(0)))
    spec = ClipSpec(0, 0, np.zeros(1, np.int32), (0.0, 0.0, 1.0, 1.0), False, None, 0, True, position=0)
    f = Feeder([[spec]] * 5, [str(p)], "bytes", 0, 1, 3, media="image")
    f._fill()
    assert len(f.queue) == 3
    f.close()
    assert not f.queue and not f.batches
    with pytest.raises(StopIteration):
        f()


def test_tiff_modes_dali_misreads_are_refused_and_only_those(tmp_path):
    """Grey+alpha, float, CIELAB and uncompressed 1-bit TIFFs fail the worker's check (DALI misread the
    first three without an error and refuses the last); a 1-bit TIFF compressed with Group 4, the usual
    form, DALI reads right: it is kept (a first version of the check refused every 1-bit TIFF)."""
    from engine.data.images import dali_problem, image_size

    def tiff(mode: str, **kw) -> bytes:
        b = io.BytesIO()
        Image.new(mode, (16, 12)).save(b, format="TIFF", **kw)
        return b.getvalue()

    for mode, kw in (("LA", {}), ("F", {}), ("LAB", {}), ("1", {})):
        with pytest.raises(ValueError, match=f"TIFF of mode {mode} .*DALI's image decoder misreads it"):
            image_size(np.frombuffer(tiff(mode, **kw), np.uint8), check=True)
    for mode, kw in (("1", {"compression": "group4"}), ("L", {}), ("RGB", {})):
        data = tiff(mode, **kw)
        assert image_size(np.frombuffer(data, np.uint8), check=True) == (12, 16)
        path = tmp_path / f"{mode}.tif"
        path.write_bytes(data)
        assert dali_problem(str(path)) is None
