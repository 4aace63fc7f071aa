"""List-file reading (``engine.data.datasets.read_list_file``): encodings, separators, headers,
official Kinetics CSVs, repeated lines and class renumbering against the run's classes (audit
defects 1-6 of the list-file reader).

Unit tests on tiny text files: reading a list never opens the listed videos, so none exist here.
"""
from __future__ import annotations

import json
import logging
import os

import pytest

from engine.data.datasets import ClassListError, read_list_file
from engine.data.errors import DataError


def write_list(tmp_path, text, name="train.csv", encoding="utf-8", classes=None):
    """``tmp_path/name`` holding ``text`` (str encoded with ``encoding``, or raw bytes), and
    ``tmp_path/classes.json`` holding ``classes`` when given. Returns the list's path."""
    p = tmp_path / name
    p.write_bytes(text if isinstance(text, bytes) else text.encode(encoding))
    if classes is not None:
        (tmp_path / "classes.json").write_text(json.dumps(classes))
    return str(p)


def rel(ds, root):
    return [os.path.relpath(p, str(root)) for p in ds.paths]


# ---- 1, 2: encodings ----------------------------------------------------------------------------
def test_utf8_bom_keeps_the_first_lines_absolute_path(tmp_path):
    first = str(tmp_path / "abs" / "a.mp4")
    p = write_list(tmp_path, f"{first} 0\nb.mp4 1\n", encoding="utf-8-sig")
    ds = read_list_file(p, str(tmp_path / "root"))
    assert ds.paths == [first, str(tmp_path / "root" / "b.mp4")]
    assert ds.labels == [0, 1]


def test_utf8_bom_before_a_relative_path_and_a_header(tmp_path):
    p = write_list(tmp_path, "path,label\nclé.mp4,1\n", encoding="utf-8-sig")
    ds = read_list_file(p, str(tmp_path))
    assert rel(ds, tmp_path) == ["clé.mp4"] and ds.labels == [1]


def test_non_utf8_list_is_a_data_error_naming_file_and_line(tmp_path):
    p = write_list(tmp_path, "a.mp4 0\nb\xe9b\xe9.mp4 1\n", encoding="latin-1")
    with pytest.raises(DataError, match=r"train\.csv:2: not UTF-8.*save the list as UTF-8"):
        read_list_file(p, str(tmp_path))


def test_utf16_list_is_a_data_error(tmp_path):
    p = write_list(tmp_path, "a.mp4 0\n", encoding="utf-16")
    with pytest.raises(DataError, match=r"train\.csv: the list is UTF-16.*save the list as UTF-8"):
        read_list_file(p, str(tmp_path))


# ---- 3: headers and official Kinetics CSVs ------------------------------------------------------
@pytest.mark.parametrize("header", ["label,youtube_id,time_start,time_end,split",
                                    "youtube_id,time_start,time_end,split"])
def test_official_kinetics_csv_says_how_to_convert(tmp_path, header):
    p = write_list(tmp_path, f"{header}\nabseiling,--3ouPhoy2A,20,30,train\n")
    with pytest.raises(DataError) as e:
        read_list_file(p, str(tmp_path))
    msg = str(e.value)
    assert "train.csv:1: this is an official Kinetics CSV" in msg
    assert "INTEGER class index" in msg and "classes.json" in msg
    assert "<youtube_id>_<time_start:06d>_<time_end:06d>.mp4" in msg


@pytest.mark.parametrize("header", ["path,label", "path label", "# a comment\nvideo\tclass", "File, Label"])
def test_header_line_is_skipped_and_the_rest_read(tmp_path, header):
    p = write_list(tmp_path, f"{header}\na.mp4,0\nb.mp4,1\n")
    ds = read_list_file(p, str(tmp_path))
    assert rel(ds, tmp_path) == ["a.mp4", "b.mp4"] and ds.labels == [0, 1]


def test_header_word_after_the_first_line_is_still_an_error(tmp_path):
    p = write_list(tmp_path, "a.mp4 0\npath label\n")
    with pytest.raises(DataError, match=r"train\.csv:2: label 'label' is not an integer.*classes\.json"):
        read_list_file(p, str(tmp_path))


def test_class_name_as_label_is_an_error_with_a_hint(tmp_path):
    p = write_list(tmp_path, "a.mp4 cat\n")
    with pytest.raises(DataError, match=r"label 'cat' is not an integer \(labels are class indices"):
        read_list_file(p, str(tmp_path))


# ---- 5: repeated lines ---------------------------------------------------------------------------
def test_exact_duplicates_are_kept_once_with_a_warning(tmp_path, caplog):
    p = write_list(tmp_path, "a.mp4 0\nb.mp4 1\na.mp4 0\n./a.mp4, 0\nb.mp4\t1\n")
    with caplog.at_level(logging.WARNING, logger="engine.data.datasets"):
        ds = read_list_file(p, str(tmp_path))
    assert rel(ds, tmp_path) == ["a.mp4", "b.mp4"] and ds.labels == [0, 1]
    assert "3 repeated line(s)" in caplog.text


def test_same_path_with_two_labels_names_both_lines(tmp_path):
    p = write_list(tmp_path, "a.mp4 0\nb.mp4 1\n\na.mp4 1\n")
    with pytest.raises(DataError, match=r"'a\.mp4' is listed with two labels: 0 on line 1 and 1 on line 4"):
        read_list_file(p, str(tmp_path))


def test_no_warning_without_duplicates(tmp_path, caplog):
    p = write_list(tmp_path, "a.mp4 0\nb.mp4 0\n")
    with caplog.at_level(logging.WARNING, logger="engine.data.datasets"):
        read_list_file(p, str(tmp_path))
    assert "repeated" not in caplog.text


# ---- 6: separators -------------------------------------------------------------------------------
@pytest.mark.parametrize("text, want", [
    ("x.mp4, 3\n", ("x.mp4", 3)),
    ("x.mp4 ,3\n", ("x.mp4", 3)),
    ("x.mp4 , 3\n", ("x.mp4", 3)),
    ("my clip.mp4,3\n", ("my clip.mp4", 3)),
    ("my clip.mp4, 3\n", ("my clip.mp4", 3)),
    ("my clip.mp4\t3\n", ("my clip.mp4", 3)),
    ("a,b.mp4 3\n", ("a,b.mp4", 3)),
    ("x.mp4,3,\n", ("x.mp4", 3)),
    # forms accepted before: space, tab, comma, CRLF, trailing spaces, repeated spaces
    ("x.mp4 3\n", ("x.mp4", 3)),
    ("x.mp4\t3\n", ("x.mp4", 3)),
    ("x.mp4,3\n", ("x.mp4", 3)),
    ("x.mp4 3\r\n", ("x.mp4", 3)),
    ("x.mp4   3   \n", ("x.mp4", 3)),
    ("  x.mp4 3", ("x.mp4", 3)),
])
def test_separators(tmp_path, text, want):
    ds = read_list_file(write_list(tmp_path, text), str(tmp_path))
    assert (rel(ds, tmp_path)[0], ds.labels[0]) == want and len(ds) == 1


def test_old_mac_line_ends_and_comments(tmp_path):
    ds = read_list_file(write_list(tmp_path, "# list\ra.mp4 0\r\rb.mp4 1\r"), str(tmp_path))
    assert rel(ds, tmp_path) == ["a.mp4", "b.mp4"] and ds.labels == [0, 1]


@pytest.mark.parametrize("line", ["a.mp4", "a.mp4,", ",3"])
def test_line_without_path_or_label_is_an_error(tmp_path, line):
    with pytest.raises(DataError, match=r"train\.csv:1: expected 'path label'"):
        read_list_file(write_list(tmp_path, line + "\n"), str(tmp_path))


def test_negative_label_is_an_error(tmp_path):
    with pytest.raises(DataError, match=r"train\.csv:1: negative label -1"):
        read_list_file(write_list(tmp_path, "a.mp4 -1\n"), str(tmp_path))


# ---- 4: the list's own class names against the run's ---------------------------------------------
def test_own_class_names_are_remapped_by_name_into_the_runs(tmp_path, caplog):
    p = write_list(tmp_path, "a.mp4 0\nb.mp4 1\nc.mp4 1\n", name="val.csv", classes=["dog", "cat"])
    with caplog.at_level(logging.INFO, logger="engine.data.datasets"):
        ds = read_list_file(p, str(tmp_path), classes=["cat", "dog", "emu"])
    assert ds.labels == [1, 0, 0] and ds.class_names == ["cat", "dog", "emu"]
    assert "renumbered by name" in caplog.text and "classes.json" in caplog.text


def test_slowfast_classnames_json_is_remapped_too(tmp_path):
    p = write_list(tmp_path, "a.mp4 0\nb.mp4 2\n", name="val.csv")
    (tmp_path / "classnames.json").write_text(json.dumps({"dog": 0, "cat": 2}))
    ds = read_list_file(p, str(tmp_path), classes=["cat", "dog"])
    assert ds.labels == [1, 0]


def test_own_names_unknown_to_the_run_are_a_class_list_error(tmp_path):
    p = write_list(tmp_path, "a.mp4 0\nb.mp4 1\nc.mp4 2\n", name="val.csv", classes=["dog", "yak", "gnu"])
    with pytest.raises(ClassListError, match=r"yak, gnu \(2 name\(s\)\) are not classes of the run"):
        read_list_file(p, str(tmp_path), classes=["dog", "cat"])


def test_unused_unknown_names_beside_the_list_do_not_matter(tmp_path):
    p = write_list(tmp_path, "a.mp4 1\n", name="val.csv", classes=["yak", "cat"])
    assert read_list_file(p, str(tmp_path), classes=["cat"]).labels == [0]


def test_label_without_own_name_is_a_class_list_error_when_remapping(tmp_path):
    p = write_list(tmp_path, "a.mp4 0\nb.mp4 5\n", name="val.csv", classes=["dog", "cat"])
    with pytest.raises(ClassListError, match=r"val\.csv:2: label 5 has no class name in .*classes\.json"):
        read_list_file(p, str(tmp_path), classes=["cat", "dog"])


def test_same_names_beside_the_list_keep_the_labels(tmp_path, caplog):
    p = write_list(tmp_path, "a.mp4 0\nb.mp4 1\n", name="val.csv", classes=["dog", "cat"])
    with caplog.at_level(logging.INFO, logger="engine.data.datasets"):
        ds = read_list_file(p, str(tmp_path), classes=["dog", "cat"])
    assert ds.labels == [0, 1] and "renumbered" not in caplog.text
    # without names beside the list: labels are only range-checked against the run's classes
    os.remove(tmp_path / "classes.json")
    assert read_list_file(p, str(tmp_path), classes=["x", "y"]).labels == [0, 1]


def test_classes_json_with_bom_is_read(tmp_path):
    p = write_list(tmp_path, "a.mp4 1\n", name="val.csv")
    (tmp_path / "classes.json").write_bytes(json.dumps(["dog", "cat"]).encode("utf-8-sig"))
    assert read_list_file(p, str(tmp_path)).class_names == ["dog", "cat"]


def test_labels_that_disagree_with_their_class_folders_are_an_error(tmp_path):
    """A classes.json in another order than the labels ("cat", "bird" where every bird/ line has label
    0) named the bird videos "cat" in the run's classes.json, silently. When every path lies in a
    folder named after a class, each label must be that class's number."""
    text = "bird/a.mp4 0\nbird/b.mp4 0\ncat/c.mp4 1\ndog/d.mp4 2\n"
    with pytest.raises(ClassListError, match=r"3 of 4 line\(s\) are labelled otherwise than their class folder: "
                                             r"line 1, 'bird/a.mp4', has label 0 \('cat'\), but its folder 'bird' is "
                                             r"class 1"):
        read_list_file(write_list(tmp_path, text, classes=["cat", "bird", "dog"]), str(tmp_path))
    ok = read_list_file(write_list(tmp_path, text, classes=["bird", "cat", "dog"]), str(tmp_path))
    assert ok.labels == [0, 0, 1, 2]
    os.remove(tmp_path / "classes.json")  # no names beside the list: the run's classes number it
    with pytest.raises(ClassListError, match="labelled otherwise than their class folder"):
        read_list_file(write_list(tmp_path, text), str(tmp_path), classes=["cat", "bird", "dog"])
    # another layout (a folder that is no class name) is not checked; nor absolute paths (an empty first
    # component, which a classnames.json gap made a class name), nor folders named by label numbers alone
    other = read_list_file(write_list(tmp_path, "clips/a.mp4 0\nclips/b.mp4 1\n", classes=["x", "y"]), str(tmp_path))
    assert other.labels == [0, 1]
    (tmp_path / "classes.json").write_text(json.dumps({"cat": 0, "": 1}))
    absolute = read_list_file(write_list(tmp_path, f"{tmp_path}/cat/a.mp4 0\n{tmp_path}/cat/b.mp4 1\n"), str(tmp_path))
    assert absolute.labels == [0, 1]
    os.remove(tmp_path / "classes.json")
    numbered = read_list_file(write_list(tmp_path, "1/a.mp4 0\n0/b.mp4 1\n"), str(tmp_path))  # shard folders
    assert numbered.labels == [0, 1]
    repeated = read_list_file(write_list(tmp_path, "cat/a.mp4 0\ncat/b.mp4 1\ndog/c.mp4 2\n", classes=["cat", "cat", "dog"]),
                              str(tmp_path))  # a name listed twice: either number is its folder's
    assert repeated.labels == [0, 1, 2]


def test_a_root_of_folders_read_as_lists_says_to_set_folder(tmp_path):
    """The demo recipes set data.dataset=demo, which reads list files: a data.root of class folders
    given to one said only that train.csv was missing."""
    from engine.data.datasets import KNOWN_VIDEO_EXTENSIONS, load_dataset

    os.makedirs(tmp_path / "train" / "cat")
    for kind in ("demo", "kinetics"):
        with pytest.raises(FileNotFoundError, match=r"train.csv not found .*holds folders: .*set data.dataset=folder"):
            load_dataset(kind, str(tmp_path), "train", KNOWN_VIDEO_EXTENSIONS)
    with pytest.raises(FileNotFoundError, match=r"train.csv not found \(expected SlowFast-style [^;]*$"):
        load_dataset("kinetics", str(tmp_path / "train" / "cat"), "train", KNOWN_VIDEO_EXTENSIONS)  # no folders
    (tmp_path / "val.csv").write_text("")  # a Kinetics root with its videos in folders, lacking one list
    with pytest.raises(FileNotFoundError, match=r"train.csv not found \(expected SlowFast-style [^;]*$"):
        load_dataset("kinetics", str(tmp_path), "train", KNOWN_VIDEO_EXTENSIONS)
