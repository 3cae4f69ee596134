"""Class names, labels and templates that would make zero-shot numbers lie are refused up front,
by one check (:func:`clipcore.zeroshot.validate_zeroshot_inputs`), before any image is embedded.

Repeated class names are the one policy that differs by entry point: evaluation (``distill.evaluate``,
benchmark suites) accepts them with one warning, as standard lists such as ImageNet-1k's repeat
names; a head that ships (parity, bundles, training) refuses them."""

from __future__ import annotations

import logging

import datasets
import pytest
import yaml

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


@pytest.mark.parametrize("case", [c for c in CASES if c != "duplicate"])  # evaluation accepts repeated names
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


def duplicate_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if "duplicate class names" in r.getMessage()]


def test_repeated_names_are_an_explicit_policy(tiny_clip, caplog):
    """Refused by default; allowed (one warning, one head row per index) only when asked for."""
    from clipcore.zeroshot import build_classifier, duplicate_classnames, validate_classnames

    names = ["missile", "dog", " Missile", "sunglasses", "sunglasses"]
    assert duplicate_classnames(names) == {"missile": [0, 2], "sunglasses": [3, 4]}
    with pytest.raises(ValueError, match=r"duplicate class names .*'missile' at positions \[0, 2\]"):
        validate_classnames(names)
    with pytest.raises(ValueError, match="duplicate class names"):
        build_classifier(tiny_clip, names, "simple")
    with caplog.at_level(logging.WARNING, logger="clipcore"):
        assert validate_classnames(names, allow_duplicates=True, source="imagenet") == names
        head = build_classifier(tiny_clip, names, "simple", allow_duplicates=True)  # no second warning
    (warned,) = duplicate_warnings(caplog)
    assert warned.startswith("imagenet: ") and "'missile' at indices [0, 2]" in warned
    assert "'sunglasses' at indices [3, 4]" in warned
    assert head.shape[0] == len(names)
    assert head[3].allclose(head[4]) and not head[0].allclose(head[1])  # each index keeps its own row


def test_evaluate_accepts_repeated_names_with_one_warning(tiny_clip_dir, tmp_path, caplog):
    from distill.evaluate import main

    data = write_labelled(tmp_path, n=6)
    with caplog.at_level(logging.WARNING, logger="clipcore"):
        report = main(["--model", str(tiny_clip_dir), "--data", str(data), "--split", "test", "--templates", "simple",
                       "--classnames", "cat,dog,Cat", "--no-progress"])
    (warned,) = duplicate_warnings(caplog)
    assert "'cat' at indices [0, 2]" in warned and "column 'label'" in warned
    assert report["zeroshot"]["num_classes"] == 3 and 0 <= report["zeroshot"]["top1"] <= 1


def test_benchmark_suite_accepts_repeated_names_with_one_warning(tiny_clip_dir, tmp_path, caplog):
    """Two models on the entry, one warning: the names are checked once, when the suite is prepared."""
    from distill.benchmark import main

    data = write_labelled(tmp_path / "d", n=6)
    suite = tmp_path / "suite.yaml"
    suite.write_text(yaml.safe_dump([{"name": "dup", "data": str(data), "split": "test", "templates": "simple",
                                      "classnames": ["cat", "dog", "Cat"]}]))
    with caplog.at_level(logging.WARNING, logger="clipcore"):
        report = main(["--model", str(tiny_clip_dir), "--reference", str(tiny_clip_dir), "--suite", str(suite),
                       "--out", str(tmp_path / "out"), "--batch-size", "8", "--no-progress", "--device", "cpu"])
    (warned,) = duplicate_warnings(caplog)
    assert warned.startswith("suite entry 'dup': ") and "'cat' at indices [0, 2]" in warned
    assert all(m["results"]["dup"]["metrics"]["num_classes"] == 3 for m in report["models"])


def test_training_refuses_repeated_names_before_the_teacher_runs(tiny_clip_dir, tmp_path):
    """The trained student's head ships (export, bundle): its class names must be distinct."""
    from distill.train import main

    recipe = tmp_path / "empty.yaml"
    recipe.write_text("{}\n")
    data = write_labelled(tmp_path / "data", n=6)
    with pytest.raises(ValueError, match=r"duplicate class names .*'cat' at positions \[0, 2\]"):
        main(["--config", str(recipe), f"teacher.name_or_path={tiny_clip_dir}", f"data.train={data}",
              "data.classnames=cat,dog,Cat", "student.arch=test-tiny", "optim.batch_size=4", "progress=false",
              f"output_dir={tmp_path / 'out'}", f"cache.dir={tmp_path / 'cache'}"])
    assert not (tmp_path / "cache").exists()  # no teacher target was computed
