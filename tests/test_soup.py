"""Model soups (distill/soup.py): the weight average of image students trained from the same start."""

from __future__ import annotations

import json

import pytest
import torch

from distill.soup import SOUP_FILE, SoupError, main, make_soup


@pytest.fixture(scope="module")
def students(tmp_path_factory, tiny_clip):
    """Two students of one architecture from the same init, moved apart; one of another architecture."""
    from clipcore.testing import make_tiny_clip
    from clipcore.loading import load_teacher
    from students import build_student, save_student

    root = tmp_path_factory.mktemp("soup")
    teacher = load_teacher(str(make_tiny_clip(root / "teacher", seed=1)))
    torch.manual_seed(0)
    a = build_student("test-tiny-resnet", teacher=teacher)
    b = build_student("test-tiny-resnet", teacher=teacher)
    b.load_state_dict(a.state_dict())
    with torch.no_grad():
        for p in b.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    save_student(a, root / "a")
    save_student(b, root / "b")
    save_student(build_student("test-tiny-vision", teacher=teacher), root / "other")
    return root, a, b, teacher


def test_the_soup_is_the_mean_of_the_weights_and_loads_as_a_student(students, tmp_path):
    from students import load_student

    root, a, b, teacher = students
    out = make_soup([root / "a", root / "b"], tmp_path / "soup")
    soup = load_student(out, teacher=teacher)
    sa, sb = a.state_dict(), b.state_dict()
    for key, value in soup.state_dict().items():
        if key.startswith("teacher"):
            continue
        if value.is_floating_point():
            assert torch.allclose(value.double(), (sa[key].double() + sb[key].double()) / 2, atol=1e-6), key
        else:  # batch-norm counters: the first ingredient's
            assert torch.equal(value, sa[key]), key
    record = json.loads((out / SOUP_FILE).read_text())
    assert [i["path"] for i in record["ingredients"]] == [str(root / "a"), str(root / "b")]
    x = torch.rand(2, 3, *soup.image_transform.output_size)
    assert soup.encode_image(x).shape == a.encode_image(x).shape


def test_ingredients_that_cannot_be_averaged_are_refused_by_name(students, tmp_path):
    import shutil

    from students.qat import save_ranges

    root = students[0]
    with pytest.raises(SoupError, match=r"other/student.json: backbone = .clip_vision., but .* only students of one architecture"):
        make_soup([root / "a", root / "other"], tmp_path / "x")
    with pytest.raises(SoupError, match="at least two students, got 1"):
        make_soup([root / "a"], tmp_path / "x")
    with pytest.raises(SoupError, match=r"nowhere: no student.json"):
        make_soup([root / "a", root / "nowhere"], tmp_path / "x")
    qat = shutil.copytree(root / "b", tmp_path / "qat")
    save_ranges({"in:stem": [0.0, 1.0]}, qat)
    with pytest.raises(SoupError, match=r"qat: a QAT student \(qat_ranges.json\)"):
        make_soup([root / "a", qat], tmp_path / "x")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    with pytest.raises(SoupError, match="exists and is not empty"):
        make_soup([root / "a", root / "b"], tmp_path / "full")
    assert (tmp_path / "full" / "keep.txt").read_text() == "mine"
    assert not (tmp_path / "x").exists()


def test_the_command_line_writes_the_soup(students, tmp_path):
    root = students[0]
    assert main([str(root / "a"), str(root / "b"), "--out", str(tmp_path / "s")]) == str(tmp_path / "s")
    assert (tmp_path / "s" / "model.safetensors").is_file()
