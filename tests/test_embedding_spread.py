"""benchmarks/embedding_spread.py: centring, the mean resultant length, and one run on tiny models."""

from __future__ import annotations

import pytest
import torch
import yaml

from clipcore.testing import make_tiny_clip
from students import build_student, load_model, save_student
from tests.datagen import write_captions, write_labelled
from tests.scripts import load_script


def _script():
    return load_script("benchmarks/embedding_spread.py")


def test_centring_and_the_mean_resultant_length():
    spread = _script()
    same = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    opposite = torch.tensor([[1.0, 0.0], [-1.0, 0.0]])
    assert spread.mean_resultant_length(same) == pytest.approx(1.0)
    assert spread.mean_resultant_length(opposite) == pytest.approx(0.0)
    e = torch.nn.functional.normalize(torch.tensor([[0.9, 0.1], [0.8, -0.2], [0.95, 0.05]]), dim=-1)
    mean = e.mean(0)
    assert torch.allclose(spread.centred(e, mean, 0.0), e)
    moved = spread.centred(e, mean, 1.0)
    assert torch.allclose(moved.norm(dim=-1), torch.ones(3))
    assert spread.mean_resultant_length(moved) < spread.mean_resultant_length(e)  # spread apart
    shared = spread.fixed_share(e, mean, 0.3)
    axis = mean / mean.norm()
    assert torch.allclose(shared.norm(dim=-1), torch.ones(3)) and torch.allclose(shared @ axis, torch.full((3,), 0.3))


def test_a_run_on_tiny_models_prints_every_entry_and_gamma(tmp_path, capsys):
    teacher_dir = make_tiny_clip(tmp_path / "teacher", seed=1)
    teacher = load_model(str(teacher_dir))
    student = save_student(build_student("test-tiny-resnet", teacher=teacher), tmp_path / "student")
    photos, labelled = write_captions(tmp_path / "photos", n=12), write_labelled(tmp_path / "labelled", n=12)
    suite = tmp_path / "suite.yaml"
    suite.write_text(yaml.safe_dump([
        {"name": "labelled", "data": str(labelled), "split": "test", "task": "zeroshot", "templates": "simple",
         "metric": "top1"},
        {"name": "photos", "data": str(photos), "split": "train", "task": "retrieval",
         "metric": "image_to_text_R@5"},
    ]))
    rows = _script().main(["--student", str(student), "--teacher", str(teacher_dir), "--suite", str(suite),
                           "--mean-data", f"{labelled}:train", "--mean-limit", "8", "--gammas", "0,1", "--shares", "0.2"])
    out = capsys.readouterr().out
    assert "teacher: mean resultant length" in out and "student: mean resultant length" in out
    assert [(r["model"], r["transform"], r["value"]) for r in rows] == [
        (model, kind, value) for model in ("teacher", "student") for kind, value in
        (("centre", 0.0), ("centre", 1.0), ("share", 0.2))]
    first = rows[0]["photos"]
    assert first["difference"] == 0.0 and first["interval"] == [0.0, 0.0]
    assert first["cosine"] == pytest.approx(1.0, abs=1e-5)  # the teacher uncentred against itself
    assert rows[1]["photos"]["cosine"] < 1.0
    assert out.count("| student |") == 3 and "| student | share 0.2 |" in out
