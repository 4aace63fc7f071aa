"""Dataset listings: Kinetics-style list files, folders of class sub-folders, ImageNet folders.

Formats (issue 5):
- Kinetics lists as in SlowFast: ``train.csv`` / ``val.csv`` / ``test.csv`` under the root, one
  ``path label`` per line (space-, tab- or comma-separated; the label is the last field, an integer
  class index), paths relative to the root unless absolute. Class names come from an optional
  ``classes.json`` (a list of names, or :func:`write_class_index`'s object) or ``classnames.json``
  ({name: index}, SlowFast) next to the lists, else they are the label numbers.
- A folder of class sub-folders (``root/<class>/<video>``; if ``root/<split>/`` exists it is used
  for that split). Classes are sorted by name; :func:`write_class_index` stores the mapping as JSON.
- ImageNet layout (``root/<split>/<class>/<image>``) for the image recipes.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


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
        with open(p) as f:
            data = json.load(f)
        if isinstance(data, dict) and isinstance(data.get("classes"), list):  # write_class_index format
            data = data["classes"]
        if isinstance(data, list):
            return [str(x) for x in data]
        if isinstance(data, dict):  # SlowFast classnames.json: {name: index}
            names = [""] * (max(int(v) for v in data.values()) + 1)
            for k, v in data.items():
                names[int(v)] = str(k)
            return names
        raise ValueError(f"{p}: expected a list of class names or a {{name: index}} object")
    n = max(labels) + 1 if labels else 0
    return [str(i) for i in range(n)]


def read_list_file(list_path: str, root: str) -> Dataset:
    """Read a SlowFast/Kinetics list file: ``path label`` per line (see module docstring)."""
    if not os.path.isfile(list_path):
        raise FileNotFoundError(f"list file {list_path} not found (expected SlowFast-style "
                                f"train.csv/val.csv/test.csv with 'path label' per line)")
    paths: list[str] = []
    labels: list[int] = []
    with open(list_path) as f:
        for lineno, raw in enumerate(f, 1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            sep = "," if "," in line and " " not in line and "\t" not in line else None
            parts = line.rsplit(sep, 1)
            if len(parts) != 2:
                raise ValueError(f"{list_path}:{lineno}: expected 'path label', got {line!r}")
            try:
                label = int(parts[1])
            except ValueError:
                raise ValueError(f"{list_path}:{lineno}: label {parts[1]!r} is not an integer") from None
            if label < 0:
                raise ValueError(f"{list_path}:{lineno}: negative label {label}")
            p = parts[0].strip()
            paths.append(p if os.path.isabs(p) else os.path.join(root, p))
            labels.append(label)
    names = _class_names_for_lists(os.path.dirname(list_path), labels)
    if labels and max(labels) >= len(names):
        raise ValueError(f"{list_path}: label {max(labels)} but only {len(names)} class names")
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


def scan_class_folders(root: str, extensions: tuple[str, ...]) -> Dataset:
    """List ``root/<class>/**/<file>`` with a recognised extension; classes sorted by name."""
    if not os.path.isdir(root):
        raise FileNotFoundError(f"dataset folder {root} not found")
    classes = sorted(d for d in os.listdir(root)
                     if os.path.isdir(os.path.join(root, d)) and not d.startswith("."))
    if not classes:
        raise ValueError(f"{root}: no class sub-folders (expected root/<class>/<file>)")
    exts = tuple(e.lower() for e in extensions)
    paths: list[str] = []
    labels: list[int] = []
    for label, cls in enumerate(classes):
        for dirpath, dirnames, filenames in os.walk(os.path.join(root, cls)):
            dirnames.sort()
            for fn in sorted(filenames):
                if fn.lower().endswith(exts) and not fn.startswith("."):
                    paths.append(os.path.join(dirpath, fn))
                    labels.append(label)
    if not paths:
        raise ValueError(f"{root}: no files with extensions {list(exts)} under the class folders")
    return Dataset(paths, labels, classes, source=root)


def write_class_index(path: str, class_names: list[str]) -> None:
    """Write ``{"classes": [...], "index": {name: i}}`` to ``path`` (e.g. ``<run>/classes.json``)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)) or ".", exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump({"classes": list(class_names),
                   "index": {n: i for i, n in enumerate(class_names)}}, f, indent=1)
    os.replace(tmp, path)


def load_dataset(dataset: str, root: str, split: str, extensions: tuple[str, ...]) -> Dataset:
    """The listing of ``split`` for a dataset kind (``kinetics`` | ``folder`` | ``image_folder``)."""
    if split not in ("train", "val", "test"):
        raise ValueError(f"split must be train, val or test, got {split!r}")
    if dataset == "kinetics" or dataset == "demo":
        return read_list_file(os.path.join(root, f"{split}.csv"), root)
    if dataset == "folder":
        sub = os.path.join(root, split)
        return scan_class_folders(sub if os.path.isdir(sub) else root, extensions)
    if dataset == "image_folder":
        sub = os.path.join(root, split)
        if not os.path.isdir(sub):
            raise FileNotFoundError(f"ImageNet-layout split folder {sub} not found")
        return scan_class_folders(sub, IMAGE_EXTENSIONS)
    raise ValueError(f"unknown dataset kind {dataset!r}")
