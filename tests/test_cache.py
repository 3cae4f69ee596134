"""Teacher-target cache: image and text targets under separate keys, every load verified, damaged
entries rebuilt with a warning (no model needed: the "teacher" is a counting function)."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest

from clipcore.cache import TeacherTargetCache

N, K, D = 10, 2, 4


class Teacher:
    """Deterministic fake embeddings that count how often each pass runs."""

    def __init__(self):
        self.image_passes = self.text_passes = 0

    def rows(self, start: int, end: int) -> np.ndarray:
        self.image_passes += 1
        return np.arange(start, end, dtype=np.float32)[:, None, None] + np.zeros((1, K, D), np.float32)

    def texts(self, texts) -> np.ndarray:
        self.text_passes += 1
        return np.array([[len(t) % 7, t.count("a"), i, 1] for i, t in enumerate(texts)], np.float32)


A = ["a photo of a cat.", "a photo of a dog."]
B = ["a bad photo of the cat.", "a bad photo of the dog."]  # as many texts as A: same shapes


def build(tmp_path, teacher: Teacher, texts=A):
    return TeacherTargetCache(tmp_path, "entry").get_or_build(N, teacher.rows, texts, teacher.texts)


def test_switching_texts_back_and_forth_never_redoes_the_image_pass(tmp_path):
    teacher = Teacher()
    first = build(tmp_path, teacher, A)
    assert not first.hit and teacher.image_passes == 1 and teacher.text_passes == 1
    other = build(tmp_path, teacher, B)
    assert teacher.image_passes == 1 and teacher.text_passes == 2  # only the new texts are embedded
    back = build(tmp_path, teacher, A)
    assert back.hit and teacher.image_passes == 1 and teacher.text_passes == 2  # both text sets stay cached
    np.testing.assert_array_equal(back.texts, teacher.texts(A))
    np.testing.assert_array_equal(other.texts, teacher.texts(B))
    np.testing.assert_array_equal(back.images, first.images)


def test_text_targets_that_are_not_the_requested_texts_are_never_returned(tmp_path, caplog):
    """Another builder with other texts (same count, same shapes) rewrote the text file: detected."""
    teacher = Teacher()
    build(tmp_path, teacher, A)
    for path in (tmp_path / "entry").glob("texts*.npy"):
        np.save(path, teacher.texts(B).astype(np.float16))
    with caplog.at_level(logging.WARNING, logger="clipcore.cache"):
        again = build(tmp_path, teacher, A)
    np.testing.assert_array_equal(again.texts, teacher.texts(A))
    assert "rebuilding" in caplog.text
    assert teacher.image_passes == 1  # the images were fine


def truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def reshape(path):
    np.save(path, np.zeros((N, K + 1, D), np.float16))


def garbage(path):
    path.write_text("{not json")


def nan_row(path):  # same size, same header: only a checksum (or a finiteness check) sees it
    arr = np.load(path, mmap_mode="r+")
    arr[3] = np.nan
    arr.flush()


def flip_row(path):  # same size, finite: only a checksum sees it
    arr = np.load(path, mmap_mode="r+")
    arr[3] = -arr[3]
    arr.flush()


@pytest.mark.parametrize("damage, target", [
    (truncate, "images-r0.npy"),  # was: "mmap length is greater than file size"
    (reshape, "images-r0.npy"),  # a shard of another shape
    (garbage, "meta.json"),
    (nan_row, "images-r0.npy"),  # issue 28 item 11: was served as a cache hit
    (flip_row, "images-r0.npy"),  # issue 28 item 11: was served as a cache hit
    (truncate, "texts"),
])
def test_a_damaged_entry_is_rebuilt_with_a_warning(tmp_path, caplog, damage, target):
    teacher = Teacher()
    first = build(tmp_path, teacher)
    paths = sorted((tmp_path / "entry").glob(target + "*.npy")) if target == "texts" else [tmp_path / "entry" / target]
    assert paths
    for path in paths:
        damage(path)
    with caplog.at_level(logging.WARNING, logger="clipcore.cache"):
        again = build(tmp_path, teacher)
    assert "rebuilding" in caplog.text and str(tmp_path / "entry") in caplog.text
    np.testing.assert_array_equal(again.images, first.images)
    np.testing.assert_array_equal(again.texts, first.texts)
    assert not again.hit
    caplog.clear()
    assert build(tmp_path, teacher).hit and "rebuilding" not in caplog.text  # and healthy again


def test_an_entry_written_before_texts_had_their_own_key_is_still_read(tmp_path):
    """The previous layout (one texts.npy, ``texts_sha`` in meta.json) keeps its 20-minute image pass."""
    from clipcore.cache import texts_sha

    entry = tmp_path / "entry"
    entry.mkdir()
    teacher = Teacher()
    np.save(entry / "images-r0.npy", teacher.rows(0, N).astype(np.float16))
    np.save(entry / "texts.npy", teacher.texts(A).astype(np.float16))
    (entry / "meta.json").write_text(json.dumps({"num_rows": N, "world": 1, "num_texts": 2, "texts_sha": texts_sha(A)}))
    teacher = Teacher()
    again = build(tmp_path, teacher, A)
    assert again.hit and teacher.image_passes == teacher.text_passes == 0
    np.testing.assert_array_equal(again.texts, Teacher().texts(A))
    build(tmp_path, teacher, B)
    assert teacher.image_passes == 0 and teacher.text_passes == 1


def test_a_texts_only_entry_is_a_hit_when_read_again(tmp_path):
    """The vocabulary of a mixture is cached as an entry of 0 image rows; reading it back must not
    trip the finiteness check of the (empty) image targets."""
    embed = lambda t: np.ones((len(t), 4), np.float32)  # noqa: E731
    no_rows = lambda s, e: np.zeros((e - s, 1, 0), np.float32)  # noqa: E731
    first = TeacherTargetCache(tmp_path, "texts").get_or_build(0, no_rows, ["a", "b"], embed)
    again = TeacherTargetCache(tmp_path, "texts").get_or_build(0, no_rows, ["a", "b"], embed)
    assert not first.hit and again.hit and again.texts.shape == (2, 4)


def test_a_nan_teacher_is_named_and_nothing_is_cached(tmp_path):
    """Issue 28 item 14: NaN targets were cached and the run then blamed training ("non-finite loss")."""
    from clipcore.cache import NonFiniteTargets

    class NanTeacher(Teacher):
        def rows(self, start, end):
            out = super().rows(start, end)
            out[2] = np.nan
            return out

    with pytest.raises(NonFiniteTargets, match=r"the teacher gives NaN/inf image embeddings for 1 of 10 rows"):
        build(tmp_path, NanTeacher())
    assert not (tmp_path / "entry" / "meta.json").exists()  # an unfinished entry: never read

    class NanTexts(Teacher):
        def texts(self, texts):
            return super().texts(texts) * np.nan

    with pytest.raises(NonFiniteTargets, match=r"the teacher gives NaN/inf text embeddings for 2 of 2 texts"):
        build(tmp_path, NanTexts())
    assert not list((tmp_path / "entry").glob("texts-*"))
    teacher = Teacher()
    assert not build(tmp_path, teacher).hit and build(tmp_path, teacher).hit  # a good teacher then builds it
