"""Dataset listings: Kinetics-style list files, folders of class sub-folders, ImageNet folders.

Formats (issue 5):
- Kinetics lists as in SlowFast: ``train.csv`` / ``val.csv`` / ``test.csv`` under the root, one
  ``path label`` per line, paths relative to the root unless absolute. The label (an integer class
  index) is the field after the last run of commas and/or whitespace; the path is the rest, so
  ``a.mp4 3``, ``a.mp4\t3``, ``a.mp4,3``, ``a.mp4, 3`` and ``my clip.mp4,3`` all work. UTF-8 (a
  byte-order mark is dropped; other encodings are a :class:`DataError` naming the line), any
  line ends, ``#`` comments, blank lines and a first header line (``path,label``) are skipped (a path
  starting with ``#`` is written ``./#...``; a comment naming an existing file is warned about). A
  path listed twice is used once (warning); twice with different labels is a DataError. Official
  Kinetics CSVs (``label,youtube_id,time_start,time_end,split``: class names, YouTube ids) are not
  read: a DataError says how to convert them (:data:`KINETICS_CSV_HELP`). Class names come from
  an optional ``classes.json`` (a list of names, or :func:`write_class_index`'s object) or
  ``classnames.json`` ({name: index}, SlowFast) next to the lists, else they are the label numbers.
- A folder of class sub-folders: ``root/<split>/<class>/<video>``, or ``root/<class>/<video>``
  used for every split when the root has none of ``train/``, ``val/``, ``test/``. A root that has
  some split folders but not the requested one is an error (a missing ``val/`` must not turn
  ``train/`` into a class). Classes are sorted by name. Files are found at any depth: hidden files
  and folders are left out, symlinked sub-folders are followed (each real folder once); files
  with a video extension (:data:`KNOWN_VIDEO_EXTENSIONS`) that ``extensions`` lacks are counted
  per extension in one warning.
- ImageNet layout (``root/<split>/<class>/<image>``) for the image recipes.

Class numbering (one list per run): the TRAIN split defines the classes. Every other split is
listed with ``load_dataset(..., classes=<train class names>)``: class folders are mapped through
that list BY NAME (a split may lack some classes; a folder that is not a training class is a
:class:`ClassListError`). List-file labels are renumbered by name into ``classes`` when the lists'
folder has its own class names that differ (a name the run lacks is a :class:`ClassListError`;
the renumbering is logged); otherwise they must be ``< len(classes)`` (else a
:class:`ClassListError` naming the file and line). Fine-tuning stores the list as
``<output_dir>/classes.json`` (:func:`write_class_index`, read back by :func:`read_class_index`).
Known limit: without class names beside the lists, list-file labels are only range-checked.
"""
from __future__ import annotations

import collections
import json
import logging
import os
import re
import unicodedata
from dataclasses import dataclass, field
from typing import Optional, Sequence

from .errors import DataError

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm",
                    ".pbm", ".pnm", ".jp2")
"""Extensions of the image formats DALI's decoder reads (``images.DALI_IMAGE_FORMATS``; not GIF)."""
OTHER_IMAGE_EXTENSIONS = (".gif", ".avif", ".heic", ".heif", ".jxl", ".svg", ".ico", ".tga", ".psd", ".dng", ".raw")
"""Image files DALI's decoder does not read: an image folder's files with one of these are counted in
a warning (they were left out without a word)."""
KNOWN_VIDEO_EXTENSIONS = (".mp4", ".webm", ".avi", ".mkv", ".mov", ".m4v", ".mts", ".m2ts", ".ts", ".3gp", ".3g2",
                          ".mpg", ".mpeg", ".m2v", ".vob", ".wmv", ".asf", ".flv", ".f4v", ".ogv", ".mxf", ".dv",
                          ".y4m")
"""Extensions of video files FFmpeg (PyAV) reads; a folder dataset's files with one of these that
``data.extensions`` leaves out are counted in a warning (:func:`scan_class_folders`)."""


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
    left_out: dict[str, int] = field(default_factory=dict)
    """Folder datasets: video files not listed because of their extension, counted per extension."""

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def subset(self, keep: list[int]) -> "Dataset":
        """The listing restricted to the indices ``keep`` (order kept)."""
        return Dataset([self.paths[i] for i in keep], [self.labels[i] for i in keep],
                       list(self.class_names), self.source, dict(self.left_out))


_UTF8_BOM = b"\xef\xbb\xbf"
_SEPARATORS = re.compile(r"[\s,]+")
_HEADER_LABELS = frozenset({"label", "labels", "label_id", "class", "class_id", "class_index", "classid",
                            "target", "category"})
_KINETICS_COLUMNS = frozenset({"youtube_id", "time_start", "time_end"})
KINETICS_CSV_HELP = (
    "The engine reads 'path label' lines (space, tab or comma separated) with an INTEGER class index as "
    "the label, and the class names in classes.json beside the list (a JSON list; name i is label i). "
    "Convert each official CSV once: number the sorted class names of the train CSV 0..K-1, write "
    "'<path relative to the root> <index>' per row, where the file of a row is "
    "<label>/<youtube_id>_<time_start:06d>_<time_end:06d>.mp4 (or wherever your download stored it), and "
    "json.dump the sorted names to classes.json; number val/test with train's names (the README's section "
    "'Pre-training MViTv2-L on Kinetics-400, multi-node' has the script)")


def _read_lines(list_path: str) -> list[str]:
    """The decoded lines of a list file: UTF-8 (a leading byte-order mark is dropped), any of
    ``\\n``, ``\\r\\n``, ``\\r`` line ends. Bytes that are not UTF-8 are a :class:`DataError` naming
    the line."""
    with open(list_path, "rb") as f:
        data = f.read()
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise DataError(f"{list_path}: the list is UTF-16 (it starts with a UTF-16 byte-order mark); "
                        f"save the list as UTF-8")
    if data.startswith(_UTF8_BOM):
        data = data[len(_UTF8_BOM):]
    lines = []
    for lineno, raw in enumerate(data.splitlines(), 1):
        try:
            lines.append(raw.decode("utf-8"))
        except UnicodeDecodeError as e:
            raise DataError(f"{list_path}:{lineno}: not UTF-8 (byte {raw[e.start]:#04x} at column {e.start + 1}); "
                            f"save the list as UTF-8") from None
    return lines


def _split_line(line: str) -> Optional[tuple[str, str]]:
    """``(path, label field)`` of a stripped list line: the label is the field after the LAST run of
    commas and/or whitespace, the path is everything before that run (so a path may hold spaces
    or commas: ``my clip.mp4,3`` and ``my clip.mp4\\t3`` are ``('my clip.mp4', '3')``). Trailing
    separators are ignored. ``None`` when the line has no separator."""
    line = line.rstrip(" \t,")
    runs = list(_SEPARATORS.finditer(line))
    if not runs or runs[-1].start() == 0:
        return None
    last = runs[-1]
    return line[:last.start()], line[last.end():]


def _is_header(label_field: str) -> bool:
    """Whether the first line of a list, whose last field is ``label_field``, is a column header
    (``path,label``, ``video label``, ``file,class`` ...)."""
    return label_field.strip().lower() in _HEADER_LABELS


def _is_kinetics_csv_header(line: str) -> bool:
    """Whether ``line`` is the header of an official Kinetics CSV
    (``label,youtube_id,time_start,time_end,split``)."""
    return _KINETICS_COLUMNS <= {f.strip().lower() for f in line.split(",")}


def _load_names_file(p: str) -> object:
    try:
        with open(p, encoding="utf-8-sig") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise DataError(f"{p}: not valid JSON ({e})") from None
    except UnicodeDecodeError:
        raise DataError(f"{p}: not UTF-8; save it as UTF-8") from None


def _class_names_beside(folder: str) -> Optional[tuple[list[str], str]]:
    """``(names, file)`` from ``classes.json`` (a list of names, or :func:`write_class_index`'s
    object) or ``classnames.json`` (SlowFast's ``{name: index}``) in ``folder``; ``None`` when
    neither exists. Index gaps of a ``{name: index}`` file are empty names."""
    for name in ("classes.json", "classnames.json"):
        p = os.path.join(folder, name)
        if not os.path.isfile(p):
            continue
        data = _load_names_file(p)
        if isinstance(data, dict) and isinstance(data.get("classes"), list):  # write_class_index format
            data = data["classes"]
        if isinstance(data, list):
            return [str(x) for x in data], p
        if isinstance(data, dict):  # SlowFast classnames.json: {name: index}
            try:
                index = {str(k): int(v) for k, v in data.items()}
            except (TypeError, ValueError):
                raise DataError(f"{p}: expected a {{name: index}} object with integer indices") from None
            if any(v < 0 for v in index.values()):
                raise DataError(f"{p}: negative class index")
            names = [""] * (max(index.values(), default=-1) + 1)
            for k, v in index.items():
                names[v] = k
            return names, p
        raise DataError(f"{p}: expected a list of class names or a {{name: index}} object")
    return None


def _class_names_for_lists(root: str, labels: list[int]) -> list[str]:
    """The class names of the lists in ``root``: from ``classes.json`` / ``classnames.json`` there
    (:func:`_class_names_beside`), else the label numbers ``'0'..str(max(labels))``."""
    found = _class_names_beside(root)
    if found is not None:
        return found[0]
    n = max(labels) + 1 if labels else 0
    return [str(i) for i in range(n)]


def _remap_to_run_classes(list_path: str, labels: list[int], linenos: list[int], own: list[str], own_file: str,
                          run: list[str]) -> list[int]:
    """``labels`` (numbered by ``own``, the names beside the list in ``own_file``) renumbered by
    name into ``run`` (the run's class list). A label without a name in ``own``, or whose name is
    not in ``run``, is a :class:`ClassListError`."""
    for label, lineno in zip(labels, linenos):
        if label >= len(own) or not own[label]:
            raise ClassListError(f"{list_path}:{lineno}: label {label} has no class name in {own_file} "
                                 f"({len(own)} names)")
    used = sorted(set(labels))
    unknown = [own[i] for i in used if own[i] not in run]
    if unknown:
        raise ClassListError(
            f"{list_path}: its classes ({own_file}) differ from the run's classes (from the training split), and "
            f"{_short(unknown, 20)} ({len(unknown)} name(s)) are not classes of the run; the model has no output "
            f"for them. Remove those lines, or evaluate a model trained on them")
    index: dict[str, int] = {}
    for i, n in enumerate(run):
        index.setdefault(n, i)
    mapping = {i: index[own[i]] for i in used}
    moved = sum(1 for i in used if mapping[i] != i)
    if moved:
        log.info("%s: the class numbering of %s differs from the run's classes; %d of its %d class(es) "
                 "renumbered by name into the run's numbering", list_path, own_file, moved, len(used))
    return [mapping[label] for label in labels]


def read_list_file(list_path: str, root: str, classes: Optional[Sequence[str]] = None) -> Dataset:
    """Read a SlowFast/Kinetics list file: ``path label`` per line (see module docstring).

    Lines: UTF-8 (a byte-order mark is dropped), ``#`` comments and blank lines skipped, an
    optional first header line (``path,label``) skipped; the label is the last field after the last
    run of commas/whitespace (:func:`_split_line`). A path listed twice with the same label is
    kept once (warning); with different labels it is a :class:`DataError` naming both lines. An
    official Kinetics CSV (``label,youtube_id,...`` header) is a :class:`DataError` saying how
    to convert it.

    ``classes``: the run's class list (from the training split). When the list's folder has its
    own ``classes.json``/``classnames.json`` that differs, the labels are renumbered by name into
    ``classes`` (a name not in ``classes`` is a :class:`ClassListError`); otherwise every label
    must be below ``len(classes)``. Without ``classes`` the class names come from the list's
    folder or are the label numbers."""
    if not os.path.isfile(list_path):
        raise FileNotFoundError(f"list file {list_path} not found (expected SlowFast-style "
                                f"train.csv/val.csv/test.csv with 'path label' per line)")
    paths: list[str] = []
    labels: list[int] = []
    linenos: list[int] = []
    first: dict[str, tuple[int, int]] = {}  # normalised path -> (line, label) of its first listing
    repeats = 0
    seen_content = False
    listing_comments: list[int] = []  # '#' lines that name an existing file: probably not comments
    listed: list[str] = []  # each kept line's path as written
    for lineno, raw in enumerate(_read_lines(list_path), 1):
        line = raw.strip()
        if not line:
            continue
        if line.startswith("#"):
            parts = _split_line(line)
            if parts is not None and parts[1].isdigit() and os.path.isfile(os.path.join(root, parts[0])):
                listing_comments.append(lineno)
            continue
        is_first, seen_content = not seen_content, True
        if is_first and _is_kinetics_csv_header(line):
            raise DataError(f"{list_path}:{lineno}: this is an official Kinetics CSV (header {line!r}: class "
                            f"names and YouTube ids), not a list of files. {KINETICS_CSV_HELP}")
        parts = _split_line(line)
        if parts is None:
            raise DataError(f"{list_path}:{lineno}: expected 'path label', got {line!r}")
        p, field_ = parts
        if p.startswith("./"):  # write_list_file's form of a path that starts with '#'
            p = p[2:]
        if is_first and _is_header(field_):
            log.info("%s:%d: skipped the header line %r", list_path, lineno, line)
            continue
        try:
            label = int(field_)
        except ValueError:
            raise DataError(f"{list_path}:{lineno}: label {field_!r} is not an integer (labels are class "
                            f"indices 0..K-1; the class names go in classes.json beside the list)") from None
        if label < 0:
            raise DataError(f"{list_path}:{lineno}: negative label {label}")
        full = p if os.path.isabs(p) else os.path.join(root, p)
        key = os.path.normpath(full)
        if key in first:
            line0, label0 = first[key]
            if label0 != label:
                raise DataError(f"{list_path}: {p!r} is listed with two labels: {label0} on line {line0} and "
                                f"{label} on line {lineno}; keep the right one")
            repeats += 1
            continue
        first[key] = (lineno, label)
        paths.append(full)
        labels.append(label)
        linenos.append(lineno)
        listed.append(p)
    if repeats:
        log.warning("%s: %d repeated line(s) (same path, same label) ignored; each file is used once",
                    list_path, repeats)
    if listing_comments:
        log.warning("%s: %d line(s) starting with '#' are comments, although they name existing files (first: line "
                    "%d); write such a path as ./#name to list it", list_path, len(listing_comments),
                    listing_comments[0])
    if classes is not None:
        names = [str(c) for c in classes]
        where = "the run's classes (from the training split)"
        beside = _class_names_beside(os.path.dirname(list_path))
        _check_folders_agree(list_path, listed, labels, linenos, beside[0] if beside is not None else names)
        if beside is not None and beside[0] != names:
            labels = _remap_to_run_classes(list_path, labels, linenos, beside[0], beside[1], names)
    else:
        names = _class_names_for_lists(os.path.dirname(list_path), labels)
        where = "the class names beside the list"
        _check_folders_agree(list_path, listed, labels, linenos, names)
    for label, lineno in zip(labels, linenos):
        if label >= len(names):
            raise ClassListError(f"{list_path}:{lineno}: label {label} is out of range: {where} number "
                                 f"{len(names)} (labels 0..{len(names) - 1})")
    return Dataset(paths, labels, names, source=list_path)


def _check_folders_agree(list_path: str, listed: Sequence[str], labels: Sequence[int], linenos: Sequence[int],
                         names: Sequence[str]) -> None:
    """ClassListError when every listed path lies in a folder named after a class (``class/file``, as
    ``data prepare`` and the Kinetics conversion write them) and some label is not that class's
    number: a ``classes.json`` in another order than the labels (it named the bird videos "cat", with
    no error). Lists of any other layout are not checked."""
    if [str(n) for n in names] == [str(i) for i in range(len(names))]:
        return  # no class names, only the label numbers: numbered folders need not be classes
    index: dict[str, int] = {}
    for i, n in enumerate(names):
        if str(n):
            index.setdefault(str(n), i)  # a repeated name: its first number, as the renumbering takes it
    folders = []
    for p in listed:
        q = p.replace("\\", "/")
        folders.append(q.split("/", 1)[0] if "/" in q and not os.path.isabs(p) and not q.startswith("/") else None)
    if not folders or any(f not in index for f in folders):
        return
    bad = [(ln, p, lab, f) for ln, p, lab, f in zip(linenos, listed, labels, folders)
           if lab >= len(names) or str(names[lab]) != f]  # (a repeated name: either of its numbers)
    if bad:
        ln, p, lab, f = bad[0]
        named = f" ({names[lab]!r})" if lab < len(names) else ""
        raise ClassListError(
            f"{list_path}: {len(bad)} of {len(listed)} line(s) are labelled otherwise than their class folder: line "
            f"{ln}, {p!r}, has label {lab}{named}, but its folder {f!r} is class {index[f]} of the class names "
            f"({', '.join(map(repr, names[:5]))}{', ...' if len(names) > 5 else ''}). The class names and the "
            "labels disagree: fix classes.json (beside the list, or the run's) or the labels")


def write_list_file(path: str, entries: list[tuple[str, int]]) -> None:
    """Write ``path label`` lines (atomically: temp name then rename). A relative path that starts
    with ``#`` (a class folder named ``#tag``) is written ``./#tag/...``: :func:`read_list_file`
    reads a line starting with ``#`` as a comment."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:  # as read_list_file reads it, whatever the locale
        for p, label in entries:
            if " " in p:
                raise ValueError(f"paths in list files cannot contain spaces: {p!r}")
            if p.startswith("#"):
                p = "./" + p
            f.write(f"{p} {label}\n")
    os.replace(tmp, path)


def subfolders(path: str) -> list[str]:
    """The sub-folders of ``path`` (hidden ones left out), sorted by name."""
    return sorted(d for d in os.listdir(path) if os.path.isdir(os.path.join(path, d)) and not d.startswith("."))


def _walk_files(folder: str) -> list[str]:
    """The non-hidden files under ``folder``, sorted per directory; symlinked sub-folders are
    followed, each real directory once (a link loop or a second link to the same folder is not
    walked again); hidden sub-folders (``.AppleDouble``, ``.git``, ...) are left out."""
    seen = {os.path.realpath(folder)}
    out: list[str] = []
    unread: list[OSError] = []  # a sub-folder without read permission (shared storage): its files were lost silently
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True, onerror=unread.append):
        keep = []
        for d in sorted(dirnames):
            real = os.path.realpath(os.path.join(dirpath, d))
            if d.startswith(".") or real in seen:
                continue
            seen.add(real)
            keep.append(d)
        dirnames[:] = keep
        out += [os.path.join(dirpath, fn) for fn in sorted(filenames) if not fn.startswith(".")]
    if unread:
        log.warning("%s: %d folder(s) cannot be read, their files are not listed: %s", folder, len(unread),
                    "; ".join(f"{e.filename} ({e.strerror or e})" for e in unread[:5]))
    return out


def warn_loose_files(folder: str, extensions: tuple[str, ...], where: str) -> list[str]:
    """Log a warning naming the files of ``extensions`` lying directly in ``folder`` (beside its class or
    split folders, where no listing reads them: a mostly flat folder with one sub-folder trained on that
    sub-folder alone, silently); returns them. Extensions compare case-blind."""
    exts = tuple(e.lower() for e in extensions)
    try:
        loose = sorted(f for f in os.listdir(folder) if not f.startswith(".") and f.lower().endswith(exts)
                       and os.path.isfile(os.path.join(folder, f)))
    except OSError:
        return []
    if loose:
        log.warning("%s: %d file(s) directly in it are not read (%s): only files under %s are; move them into one",
                    folder, len(loose), _short(loose, 5), where)
    return loose


def class_key(name: str) -> str:
    """A class name as compared (Unicode NFC): a name spelt in decomposed form, as macOS copies
    write it, is the same class."""
    return unicodedata.normalize("NFC", str(name))


def scan_class_folders(root: str, extensions: tuple[str, ...],
                       classes: Optional[Sequence[str]] = None, *, images: bool = False) -> Dataset:
    """List ``root/<class>/**/<file>`` with a recognised extension (``images``: an image folder, whose
    files of formats DALI does not read are counted in the warning, as video files of other
    extensions are for a video folder).

    Without ``classes`` the folders are the classes, sorted by name (a folder without files stays
    a class: see :func:`empty_classes`). With ``classes`` (the run's list, from the training
    split) each folder takes the index of its name in that list (compared in Unicode NFC: a name
    spelt in decomposed form, as macOS copies write it, was "not a class"); a folder that is not in
    the list is a :class:`ClassListError`, and classes without a folder here simply have no files."""
    if not os.path.isdir(root):
        raise FileNotFoundError(f"dataset folder {root} not found")
    folders = subfolders(root)
    if not folders:
        kind = "images" if images else "videos"
        raise DataError(f"{root}: no class sub-folders (expected {root}/<class>/<file>; unlabelled {kind} for "
                        f"pre-training go in one folder, e.g. {root}/all/<file>)")
    names = folders if classes is None else [str(c) for c in classes]
    index = {n: i for i, n in enumerate(names)}
    if classes is not None:
        # a name spelt in another Unicode form (a split copied on macOS: NFD) is the same class
        nfc = {class_key(n): i for i, n in enumerate(names)}
        index.update({d: nfc[class_key(d)] for d in folders if d not in index and class_key(d) in nfc})
        unknown = [d for d in folders if d not in index]
        if unknown:
            raise ClassListError(
                f"{root}: class folder(s) {unknown} are not classes of the training split "
                f"({len(names)} classes: {_short(names)}); the model has no output for them. Remove or "
                f"rename them, or fine-tune on a training split that has them")
    exts = tuple(e.lower() for e in extensions)
    warn_loose_files(root, exts, "its class folders")
    paths: list[str] = []
    labels: list[int] = []
    left_out: collections.Counter[str] = collections.Counter()  # extension -> files not listed
    others = OTHER_IMAGE_EXTENSIONS if images else KNOWN_VIDEO_EXTENSIONS
    pictures = 0  # image files in a video folder (a folder of images given as data.dataset=folder)
    for cls in folders:
        label = index[cls]
        for f in _walk_files(os.path.join(root, cls)):
            low = f.lower()
            if low.endswith(exts):
                paths.append(f)
                labels.append(label)
            elif low.endswith(others):
                left_out[os.path.splitext(f)[1]] += 1
            elif not images and low.endswith(IMAGE_EXTENSIONS + OTHER_IMAGE_EXTENSIONS):
                pictures += 1
    kind, hint = (("image", "DALI's image decoder does not read them: convert them (e.g. to PNG) to use them")
                  if images else ("video", "add them to data.extensions (`maskfeat data prepare --extensions`) "
                                           "to use them"))
    if left_out:
        log.warning("%s: %d %s file(s) left out for their extension (%s): %s", root, sum(left_out.values()), kind,
                    ", ".join(f"{e} {n}" for e, n in sorted(left_out.items())), hint)
    if not paths:
        raise DataError(f"{root}: no files with extensions {list(exts)} under the class folders"
                        + (f" ({sum(left_out.values())} {kind} file(s) with other extensions: "
                           f"{', '.join(sorted(left_out))}; " + ("see data.extensions)" if not images else
                                                                  "formats DALI does not read)") if left_out else "")
                        + (f"; it holds {pictures} image file(s): an image dataset is data.dataset=image_folder "
                           "(root/train/<class>/, root/val/<class>/) with an image model (e.g. model.name=vit_b_16)"
                           if pictures else ""))
    return Dataset(paths, labels, list(names), source=root, left_out=dict(left_out))


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
    return class_index_from(_load_names_file(path), path)


def class_index_from(data: object, where: str) -> tuple[list[str], int]:
    """:func:`read_class_index` of the parsed JSON ``data`` (``where``: its source, for messages)."""
    if isinstance(data, list):
        names = [str(x) for x in data]
        return names, len(names)
    if isinstance(data, dict) and isinstance(data.get("classes"), list):
        names = [str(x) for x in data["classes"]]
        k = int(data.get("num_classes", len(names)))
        if k < len(names):
            raise ClassListError(f"{where}: num_classes={k} is smaller than its {len(names)} class names")
        return names, k
    raise ClassListError(f"{where}: expected {{\"classes\": [...]}} or a list of class names")


SPLIT_SPELLINGS = {"train": "train", "training": "train", "val": "val", "valid": "val", "validation": "val",
                   "test": "test", "testing": "test"}
"""Folder names (case ignored) that name a split; only the lower-case train/val/test are read as one."""


def check_no_split_lookalikes(root: str) -> None:
    """A DataError when ``root`` (a folder with none of train/val/test) has folders spelt like
    splits (``Train``, ``Validation``, ``testing``): read as class folders they trained a
    "Train vs Val" classifier on the val videos too, silently."""
    like = sorted(d for d in subfolders(root) if d.lower() in SPLIT_SPELLINGS)
    if like:
        names = ", ".join(f"{d} -> {SPLIT_SPELLINGS[d.lower()]}" for d in like)
        raise DataError(f"{root} has folder(s) spelt like splits ({names}): only the lower-case names train, val "
                        "and test are split folders, so these would be read as classes; rename them (or, if they "
                        "really are classes, give them other names)")


def split_folder(root: str, split: str) -> str:
    """The class-folder root of ``split`` in a ``folder`` dataset: ``root/<split>`` when it exists;
    ``root`` itself when the root has none of train/val/test (one folder for every split) nor
    folders spelt like them (:func:`check_no_split_lookalikes`); an error when it has some of them
    but not ``split``, which names a held-out split to use (val or test; train only when alone)."""
    sub = os.path.join(root, split)
    if os.path.isdir(sub):
        return sub
    if not os.path.isdir(root):
        raise FileNotFoundError(f"dataset folder {root} not found")
    present = [s for s in SPLITS if os.path.isdir(os.path.join(root, s))]
    if present:
        held_out = [s for s in present if s != "train"]
        if split == "train":  # (no eval_split replaces it: pre-training and fine-tuning read it)
            raise FileNotFoundError(f"{sub} not found; the split folders present are {present}: training reads "
                                    f"{sub}/<class>/ (or, without any split folder, {root}/<class>/)")
        use = (f"set finetune.eval_split={held_out[0]}" if held_out else
               "set finetune.eval_split=train (accuracy on the training videos)")
        raise FileNotFoundError(f"{sub} not found; the split folders present are {present} ({use} or add the folder)")
    check_no_split_lookalikes(root)
    if split != "train":
        log.warning("%s has no train/val/test folders: the %s split reads the same class folders as training, so "
                    "its accuracy is on training videos (add %s/%s, or a split's own folders)", root, split, root, split)
    return root


def load_dataset(dataset: str, root: str, split: str, extensions: tuple[str, ...],
                 classes: Optional[Sequence[str]] = None) -> Dataset:
    """The listing of ``split`` for a dataset kind (``kinetics`` | ``demo`` | ``folder`` |
    ``image_folder``). ``classes``: the run's class list (training split's names), through which
    the split's classes are mapped (module docstring); ``None`` lists the split's own classes."""
    if split not in SPLITS:
        raise ValueError(f"split must be train, val or test, got {split!r}")
    if dataset == "kinetics" or dataset == "demo":
        try:
            return read_list_file(os.path.join(root, f"{split}.csv"), root, classes)
        except FileNotFoundError as e:
            if (os.path.isdir(root) and subfolders(root)
                    and not any(f.lower().endswith(".csv") for f in os.listdir(root))):  # (a Kinetics root lacking one split)
                # (the demo recipes set data.dataset=demo: a root of class folders given to one read lists)
                raise FileNotFoundError(f"{e}; {root} holds folders: for train/<class>/ or <class>/ folders of "
                                        "videos set data.dataset=folder (image_folder for images)") from None
            raise
    if dataset == "folder":
        folder = split_folder(root, split)
        if folder != root:
            warn_loose_files(root, extensions, "its split folders")
        return scan_class_folders(folder, extensions, classes)
    if dataset == "image_folder":
        sub = os.path.join(root, split)
        if not os.path.isdir(sub):
            raise FileNotFoundError(f"ImageNet-layout split folder {sub} not found")
        return scan_class_folders(sub, IMAGE_EXTENSIONS, classes, images=True)
    raise ValueError(f"unknown dataset kind {dataset!r}")
