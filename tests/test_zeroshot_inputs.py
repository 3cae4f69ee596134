"""Class names, labels and templates that would make zero-shot numbers lie are refused up front,
by one check (:func:`clipcore.zeroshot.validate_zeroshot_inputs`), before any image is embedded."""

from __future__ import annotations

import datasets
import pytest

from clipcore.templates import get_templates
from tests.datagen import png, write_labelled

BAD_TEMPLATES = {
    "{x} {}": "'{x} {}'",  # a named field: KeyError after the whole embedding pass, before
    "a {} of a {}.": "'a {} of a {}.'",  # a second placeholder: IndexError, before
    "a {:>20} photo": "'a {:>20} photo'",  # a format spec
    "a {} photo {": "'a {} photo {'",  # unbalanced brace
}


def write_int_labels(root, labels):
    """A parquet test split whose label column is plain integers (no ClassLabel names)."""
    feats = datasets.Features({"image": datasets.Image(), "label": datasets.Value("int64")})
    rows = {"image": [{"bytes": png(i), "path": None} for i in range(len(labels))], "label": list(labels)}
    datasets.Dataset.from_dict(rows, features=feats).to_parquet(str(root / "test-00000-of-00001.parquet"))
    return root


def test_the_validation_function():
    from clipcore.zeroshot import validate_zeroshot_inputs

    assert validate_zeroshot_inputs(["cat", "dog"], "simple", [0, 1, 1]) == (["cat", "dog"], ("a photo of a {}.",))
    assert validate_zeroshot_inputs(["a", "b"], ["{{literal}} {}", "{0}!"])[1] == ("{{literal}} {}", "{0}!")
    with pytest.raises(ValueError, match=r"duplicate class names .*'cat' at positions \[0, 2\]"):
        validate_zeroshot_inputs(["cat", "dog", " Cat"], "simple")
    with pytest.raises(ValueError, match=r"labels: label 2 .* 2 class names"):
        validate_zeroshot_inputs(["cat", "dog"], "simple", [0, 1, 2, 1])
    with pytest.raises(ValueError, match=r"labels: label -1 "):
        validate_zeroshot_inputs(["cat", "dog"], "simple", [0, -1])
    for bad, shown in BAD_TEMPLATES.items():
        with pytest.raises(ValueError, match="template " + shown.replace("{", r"\{").replace("}", r"\}")
                           .replace("(", r"\(").replace(".", r"\.")):
            get_templates([bad])
        with pytest.raises(ValueError, match="exactly one"):
            get_templates(bad)


@pytest.fixture
def no_embedding(monkeypatch):
    """Make every image-embedding entry point fail loudly: the checks must come first."""
    import distill.evaluate
    import exports.bundle
    import exports.parity.run

    def boom(*args, **kwargs):
        raise AssertionError("an image was embedded before the inputs were validated")

    monkeypatch.setattr(distill.evaluate, "embed_images", boom)
    monkeypatch.setattr(exports.parity.run, "embed_dataset", boom)
    monkeypatch.setattr(exports.parity.run, "build_heads", boom)
    monkeypatch.setattr(exports.bundle, "export_image_encoder", boom)
    monkeypatch.setattr(exports.bundle, "build_classifier", boom)


CASES = {  # (classnames flag, templates flag, integer labels?) -> error
    "duplicate": ("cat,dog,cat", "simple", False, "duplicate class names"),
    "label-out-of-range": ("cat,dog", "simple", True, "label 2 "),
    "named-field": (None, "{x} {}", False, "exactly one '{}'"),
    "second-placeholder": (None, "a {} of a {}.", False, "exactly one '{}'"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_evaluate_refuses_before_embedding(tiny_clip_dir, tmp_path, no_embedding, case):
    from distill.evaluate import main

    names, templates, int_labels, message = CASES[case]
    data = write_int_labels(tmp_path, [0, 1, 2, 1]) if int_labels else write_labelled(tmp_path, n=6)
    argv = ["--model", str(tiny_clip_dir), "--data", str(data), "--split", "test", "--templates", templates,
            "--no-progress", *(["--classnames", names] if names else [])]
    with pytest.raises(ValueError, match=message.replace("{", r"\{").replace("}", r"\}")):
        main(argv)


@pytest.mark.parametrize("case", list(CASES))
def test_parity_refuses_before_embedding(tiny_clip_dir, tmp_path, no_embedding, capsys, case):
    from exports.parity import main

    names, templates, int_labels, message = CASES[case]
    data = write_int_labels(tmp_path, [0, 1, 2, 1]) if int_labels else write_labelled(tmp_path, n=6)
    argv = ["--teacher", str(tiny_clip_dir), "--student", str(tiny_clip_dir), "--data", str(data), "--split", "test",
            "--templates", templates, "--variants", "fp32", "--out", str(tmp_path / "out"),
            *(["--classnames", names] if names else [])]
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err  # datasets may log "Generating test split" first
    assert "Traceback" not in err and err.strip().splitlines()[-1].startswith("error: ") and message in err


@pytest.mark.parametrize("names, templates, message", [
    (["cat", "dog", "CAT"], "simple", "duplicate class names"),
    (["cat", "dog"], ["{x} {}"], "exactly one '{}'"),
])
def test_write_bundle_refuses_before_exporting(tiny_clip, tmp_path, no_embedding, names, templates, message):
    from exports.bundle import write_bundle

    with pytest.raises(ValueError, match=message.replace("{", r"\{").replace("}", r"\}")):
        write_bundle(tiny_clip, names, templates, tmp_path / "bundle")
    assert not (tmp_path / "bundle").exists()
