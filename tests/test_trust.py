"""Issue 28, items 10, 13 and 14: inputs checked before the work, one ``error:`` line naming the key,
file or value, exit 2. docs/reliability.md maps each promise to its test here."""

from __future__ import annotations

import datasets
import pytest

from clipcore.testing import make_tiny_clip
from distill.train import cli
from tests.datagen import png


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_clip(tmp_path_factory.mktemp("trust") / "model", seed=3)


def int_labelled(root, labels):
    """A parquet train split with a plain integer label column (no ClassLabel names)."""
    root.mkdir(parents=True, exist_ok=True)
    feats = datasets.Features({"image": datasets.Image(), "label": datasets.Value("int64")})
    rows = {"image": [{"bytes": png(i), "path": None} for i in range(len(labels))], "label": list(labels)}
    datasets.Dataset.from_dict(rows, features=feats).to_parquet(str(root / "train-00000-of-00001.parquet"))
    return root


def error_line(stderr: str) -> str:
    """The one ``error:`` line, the last of stderr (datasets' progress bars may come before it)."""
    lines = stderr.strip().splitlines()
    assert "Traceback" not in stderr and [x for x in lines if x.startswith("error: ")] == lines[-1:], stderr
    return lines[-1]


# ------------------------------------------------------------ item 10: contrastive labels vs class names


@pytest.mark.parametrize("labels, bad", [([0, 1, 2, 3, 4, 0, 1, 2], 4), ([0, 1, 2, -1, 0, 1, 2, 0], -1)])
def test_contrastive_labels_outside_the_class_names_are_refused_before_any_tower_pass(
        model_dir, tmp_path, capsys, monkeypatch, labels, bad):
    from distill import contrastive

    def never(*args, **kwargs):
        pytest.fail("a tower pass ran before the labels were checked")

    monkeypatch.setattr(contrastive, "cached_image_tower_features", never)
    monkeypatch.setattr(contrastive, "cached_text_tower_features", never)
    data = int_labelled(tmp_path / "data", labels)
    (tmp_path / "empty.yaml").write_text("{}\n")
    argv = ["--config", str(tmp_path / "empty.yaml"), "mode=contrastive", f"contrastive.model={model_dir}",
            f"data.train={data}", "data.classnames=cat,dog,car", "data.templates=simple", "optim.batch_size=4",
            "optim.max_steps=1", "progress=false", f"output_dir={tmp_path / 'out'}", f"cache.dir={tmp_path / 'cache'}"]
    capsys.readouterr()
    assert cli(argv) == 2
    err = error_line(capsys.readouterr().err)
    assert str(data) in err and f"label {bad} is outside [0, 3) for 3 class names" in err, err
