"""Dataset listings: Kinetics-style list files, folders of class sub-folders, ImageNet folders.

Formats (issue 5):
- Kinetics lists as in SlowFast: ``train.csv`` / ``val.csv`` / ``test.csv`` under the root, one
  ``path label`` per line (space-, tab- or comma-separated; the label is the last field, an integer
  class index), paths relative to the root unless absolute. Class names come from an optional
  ``classes.json`` (a list of names, or :func:`write_class_index`'s object) or ``classnames.json``
  ({name: index}, SlowFast) next to the lists, else they are the label numbers.
- A folder of class sub-folders: ``root/<split>/<class>/<video>``, or ``root/<class>/<video>``
  used for every split when the root has none of ``train/``, ``val/``, ``test/``. A root that has
  some split folders but not the requested one is an error (a missing ``val/`` must not turn
  ``train/`` into a class). Classes are sorted by name.
- ImageNet layout (``root/<split>/<class>/<image>``) for the image recipes.

Class numbering (one list per run): the TRAIN split defines the classes. Every other split is
listed with ``load_dataset(..., classes=<train class names>)``: class folders are mapped through
that list BY NAME (a split may lack some classes; a folder that is not a training class is a
:class:`ClassListError`), and list-file labels must be ``< len(classes)`` (else a
:class:`ClassListError` naming the file and line). Fine-tuning stores the list as
``<output_dir>/classes.json`` (:func:`write_class_index`, read back by :func:`read_class_index`).
Known limit: list-file labels are integers and are only range-checked, never re-mapped.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from typing import Optional, Sequence

from .errors import DataError

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


class ClassListError(DataError):
    """A split's classes do not fit the class list of the run (unknown class folder, label out of
    range, a resumed run whose training classes changed, an unreadable ``classes.json``). A
    :class:`~engine.data.errors.DataError` (so a ValueError): ``maskfeat`` exits with 5."""


@dataclass
class Dataset:
    """A listing: parallel lists of absolute paths and integer labels, plus the class names."""

    paths: list[str]
    labels: list[int]
    class_names: list[str] = field(default_factory=list)
    source: str = ""
    """Where the listing came from (list file or folder), for messages."""

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def subset(self, keep: list[int]) -> "Dataset":
        """The listing restricted to the indices ``keep`` (order kept)."""
        return Dataset([self.paths[i] for i in keep], [self.labels[i] for i in keep],
                       list(self.class_names), self.source)


def _class_names_for_lists(root: str, labels: list[int]) -> list[str]:
    for name in ("classes.json", "classnames.json"):
        p = os.path.join(root, name)
        if not os.path.isfile(p):
            continue
        try:
            with open(p) as f:
                data = json.load(f)
        except json.JSONDecodeError as e:
            raise DataError(f"{p}: not valid JSON ({e})") from None
        if isinstance(data, dict) and isinstance(data.get("classes"), list):  # write_class_index format
            data = data["classes"]
        if isinstance(data, list):
            return [str(x) for x in data]
        if isinstance(data, dict):  # SlowFast classnames.json: {name: index}
            names = [""] * (max(int(v) for v in data.values()) + 1)
            for k, v in data.items():
                names[int(v)] = str(k)
            return names
        raise DataError(f"{p}: expected a list of class names or a {{name: index}} object")
    n = max(labels) + 1 if labels else 0
    return [str(i) for i in range(n)]


def read_list_file(list_path: str, root: str, classes: Optional[Sequence[str]] = None) -> Dataset:
    """Read a SlowFast/Kinetics list file: ``path label`` per line (see module docstring).

    ``classes``: the run's class list (from the training split); every label must be below its
    length. Without it the class names come from the list's folder (``classes.json`` /
    ``classnames.json``) or are the label numbers."""
    if not os.path.isfile(list_path):
        raise FileNotFoundError(f"list file {list_path} not found (expected SlowFast-style "
                                f"train.csv/val.csv/test.csv with 'path label' per line)")
    paths: list[str] = []
    labels: list[int] = []
    linenos: list[int] = []
    with open(list_path) as f:
        for lineno, raw in enumerate(f, 1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            sep = "," if "," in line and " " not in line and "\t" not in line else None
            parts = line.rsplit(sep, 1)
            if len(parts) != 2:
                raise DataError(f"{list_path}:{lineno}: expected 'path label', got {line!r}")
            try:
                label = int(parts[1])
            except ValueError:
                raise DataError(f"{list_path}:{lineno}: label {parts[1]!r} is not an integer") from None
            if label < 0:
                raise DataError(f"{list_path}:{lineno}: negative label {label}")
            p = parts[0].strip()
            paths.append(p if os.path.isabs(p) else os.path.join(root, p))
            labels.append(label)
            linenos.append(lineno)
    if classes is not None:
        names = [str(c) for c in classes]
        where = "the run's classes (from the training split)"
    else:
        names = _class_names_for_lists(os.path.dirname(list_path), labels)
        where = "the class names beside the list"
    for label, lineno in zip(labels, linenos):
        if label >= len(names):
            raise ClassListError(f"{list_path}:{lineno}: label {label} is out of range: {where} number "
                                 f"{len(names)} (labels 0..{len(names) - 1})")
    return Dataset(paths, labels, names, source=list_path)


def write_list_file(path: str, entries: list[tuple[str, int]]) -> None:
    """Write ``path label`` lines (atomically: temp name then rename)."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        for p, label in entries:
            if " " in p:
                raise ValueError(f"paths in list files cannot contain spaces: {p!r}")
            f.write(f"{p} {label}\n")
    os.replace(tmp, path)


def scan_class_folders(root: str, extensions: tuple[str, ...],
                       classes: Optional[Sequence[str]] = None) -> Dataset:
    """List ``root/<class>/**/<file>`` with a recognised extension.

    Without ``classes`` the folders are the classes, sorted by name (a folder without files stays
    a class: see :func:`empty_classes`). With ``classes`` (the run's list, from the training
    split) each folder takes the index of its name in that list; a folder that is not in the list
    is a :class:`ClassListError`, and classes without a folder here simply have no files."""
    if not os.path.isdir(root):
        raise FileNotFoundError(f"dataset folder {root} not found")
    folders = sorted(d for d in os.listdir(root)
                     if os.path.isdir(os.path.join(root, d)) and not d.startswith("."))
    if not folders:
        raise DataError(f"{root}: no class sub-folders (expected root/<class>/<file>)")
    if classes is None:
        names = folders
    else:
        names = [str(c) for c in classes]
        unknown = [d for d in folders if d not in names]
        if unknown:
            raise ClassListError(
                f"{root}: class folder(s) {unknown} are not classes of the training split "
                f"({len(names)} classes: {_short(names)}); the model has no output for them. Remove or "
                f"rename them, or fine-tune on a training split that has them")
    index = {n: i for i, n in enumerate(names)}
    exts = tuple(e.lower() for e in extensions)
    paths: list[str] = []
    labels: list[int] = []
    for cls in folders:
        label = index[cls]
        for dirpath, dirnames, filenames in os.walk(os.path.join(root, cls)):
            dirnames.sort()
            for fn in sorted(filenames):
                if fn.lower().endswith(exts) and not fn.startswith("."):
                    paths.append(os.path.join(dirpath, fn))
                    labels.append(label)
    if not paths:
        raise DataError(f"{root}: no files with extensions {list(exts)} under the class folders")
    return Dataset(paths, labels, list(names), source=root)


def _short(names: Sequence[str], n: int = 8) -> str:
    return ", ".join(names[:n]) + (f", ... ({len(names) - n} more)" if len(names) > n else "")


def empty_classes(ds: Dataset) -> list[str]:
    """Names of the classes of ``ds`` that have no file in it (an empty class folder, or one whose
    files were all left out as bad). They keep their number: the numbering must stay stable."""
    have = set(ds.labels)
    return [n for i, n in enumerate(ds.class_names) if i not in have]


def warn_empty_classes(ds: Dataset) -> list[str]:
    """Log a warning naming each class of ``ds`` without files; returns their names."""
    empty = empty_classes(ds)
    if empty:
        log.warning("%s: %d class(es) have no usable files and can never be predicted right: %s "
                    "(they keep their class number)", ds.source, len(empty), _short(empty, 20))
    return empty


def write_class_index(path: str, class_names: Sequence[str], num_classes: Optional[int] = None) -> None:
    """Write ``{"classes": [...], "index": {name: i}, "num_classes": K}`` to ``path`` atomically
    (temp name then rename; e.g. ``<run>/classes.json``). ``num_classes`` is the classifier width
    (default ``len(class_names)``; larger when ``finetune.num_classes`` widened the head)."""
    names = [str(n) for n in class_names]
    k = len(names) if num_classes is None else int(num_classes)
    if k < len(names):
        raise ValueError(f"num_classes={k} is smaller than the {len(names)} class names")
    os.makedirs(os.path.dirname(os.path.abspath(path)) or ".", exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump({"classes": names, "index": {n: i for i, n in enumerate(names)}, "num_classes": k}, f, indent=1)
    os.replace(tmp, path)


def read_class_index(path: str) -> tuple[list[str], int]:
    """``(class names, classifier width)`` from a :func:`write_class_index` file (a plain JSON list
    of names is also accepted; its width is its length)."""
    try:
        with open(path) as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise ClassListError(f"{path}: not valid JSON ({e})") from None
    if isinstance(data, list):
        names = [str(x) for x in data]
        return names, len(names)
    if isinstance(data, dict) and isinstance(data.get("classes"), list):
        names = [str(x) for x in data["classes"]]
        k = int(data.get("num_classes", len(names)))
        if k < len(names):
            raise ClassListError(f"{path}: num_classes={k} is smaller than its {len(names)} class names")
        return names, k
    raise ClassListError(f"{path}: expected {{\"classes\": [...]}} or a list of class names")


def split_folder(root: str, split: str) -> str:
    """The class-folder root of ``split`` in a ``folder`` dataset: ``root/<split>`` when it exists;
    ``root`` itself when the root has none of train/val/test (one folder for every split); an
    error when it has some of them but not ``split``."""
    sub = os.path.join(root, split)
    if os.path.isdir(sub):
        return sub
    if not os.path.isdir(root):
        raise FileNotFoundError(f"dataset folder {root} not found")
    present = [s for s in SPLITS if os.path.isdir(os.path.join(root, s))]
    if present:
        raise FileNotFoundError(f"{sub} not found; the split folders present are {present} "
                                f"(set finetune.eval_split or add the folder)")
    return root


def load_dataset(dataset: str, root: str, split: str, extensions: tuple[str, ...],
                 classes: Optional[Sequence[str]] = None) -> Dataset:
    """The listing of ``split`` for a dataset kind (``kinetics`` | ``demo`` | ``folder`` |
    ``image_folder``). ``classes``: the run's class list (training split's names), through which
    the split's classes are mapped (module docstring); ``None`` lists the split's own classes."""
    if split not in SPLITS:
        raise ValueError(f"split must be train, val or test, got {split!r}")
    if dataset == "kinetics" or dataset == "demo":
        return read_list_file(os.path.join(root, f"{split}.csv"), root, classes)
    if dataset == "folder":
        return scan_class_folders(split_folder(root, split), extensions, classes)
    if dataset == "image_folder":
        sub = os.path.join(root, split)
        if not os.path.isdir(sub):
            raise FileNotFoundError(f"ImageNet-layout split folder {sub} not found")
        return scan_class_folders(sub, IMAGE_EXTENSIONS, classes)
    raise ValueError(f"unknown dataset kind {dataset!r}")
