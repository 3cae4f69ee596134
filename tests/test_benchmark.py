import json
from pathlib import Path

import pytest
import torch
import yaml

from clipcore.prompts import dataset_key, load_templates
from distill.suite import SuiteError, load_suite, parse_suite, prepare_suite
from tests.conftest import require_shared
from tests.datagen import write_captions, write_labelled

REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------ templates


def test_templates_from_json_list_and_clip_benchmark_map(tmp_path):
    listed = tmp_path / "t.json"
    listed.write_text(json.dumps(["a photo of a {}.", "a drawing of a {c}."]))
    assert load_templates(str(listed)) == ("a photo of a {}.", "a drawing of a {}.")
    cb = tmp_path / "en_zeroshot_classification_templates.json"
    cb.write_text(json.dumps({"mnist": ['a photo of the number: "{c}".'],
                              "gtsrb": ['a zoomed in photo of a "{c}" traffic sign.']}))
    assert load_templates(str(cb), dataset="clip-benchmark/wds_mnist") == ('a photo of the number: "{}".',)
    assert load_templates(f"{cb}#gtsrb", dataset="whatever") == ('a zoomed in photo of a "{}" traffic sign.',)
    with pytest.raises(ValueError, match="no templates for 'cifar10'"):
        load_templates(str(cb), dataset="../shared/data/cifar10")
    with pytest.raises(ValueError, match="choose one with"):
        load_templates(str(cb))
    with pytest.raises(FileNotFoundError, match="missing.json"):
        load_templates(str(tmp_path / "missing.json"))


@pytest.mark.parametrize("bad, match", [(["no slot"], "exactly one"), (["{} and {}"], "exactly one"),
                                        (["a {x} {}"], "not a valid format"), ([], "non-empty")])
def test_bad_templates_name_the_problem(bad, match):
    with pytest.raises(ValueError, match=match):
        load_templates(bad)


def test_dataset_key():
    assert dataset_key("clip-benchmark/wds_cifar10") == "cifar10"
    assert dataset_key("../shared/data/cifar10/") == "cifar10"


def test_evaluate_cli_takes_a_template_file(tiny_clip_dir, tmp_path):
    from distill.evaluate import main

    data = write_labelled(tmp_path / "d")
    tfile = tmp_path / "templates.json"
    tfile.write_text(json.dumps({"d": ["a photo of a {c}.", "a sketch of a {c}."]}))
    report = main(["--model", str(tiny_clip_dir), "--data", str(data), "--templates", str(tfile), "--no-progress"])
    assert report["zeroshot"]["num_templates"] == 2
    with pytest.raises(ValueError, match="no templates for 'other'"):
        main(["--model", str(tiny_clip_dir), "--data", str(data), "--templates", f"{tfile}#other", "--no-progress"])


# ---------------------------------------------------------------------------------- suites


def test_parse_suite_defaults_and_shared_suite_file():
    entries = parse_suite([{"name": "a", "data": "x"}, {"name": "b", "data": "y", "task": "retrieval"}])
    assert entries[0].metric == "top1" and entries[0].templates == "openai_cifar"
    assert entries[1].metric == "image_to_text_R@5"
    shared = load_suite(REPO / "suites" / "shared.yaml")
    assert [e.name for e in shared] == ["cifar10", "tiny-imagenet", "coco-mini", "scene-photos"]
    assert shared[3].split == "validation" and shared[3].task == "retrieval"  # a tuning split, never "train"
    assert len(load_suite(REPO / "suites" / "clip_benchmark.yaml")) >= 4
    fit = load_suite(REPO / "suites" / "scene_fit.yaml")  # seen against unseen photos, same student
    assert [(e.split, e.limit) for e in fit] == [("train", 500), ("validation", None)]


@pytest.mark.parametrize("raw, match", [
    ({"data": "x"}, "'name' must be"),
    ({"name": "a", "data": "x", "task": "detection"}, "task='detection'"),
    ({"name": "a", "data": "x", "metric": "R@5"}, "metric='R@5'"),
    ({"name": "a", "data": "x", "task": "retrieval", "metric": "top1"}, "metric='top1'"),
    ({"name": "a", "data": "x", "limit": 0}, "limit=0"),
    ({"name": "a", "data": "x", "colour": 1}, r"unknown key\(s\) \['colour'\]"),
    ({"name": "a", "data": "x", "task": "retrieval", "templates": "simple"}, "zero-shot entries only"),
])
def test_bad_entries_name_entry_and_key(raw, match):
    with pytest.raises(SuiteError, match=match) as info:
        parse_suite([{"name": "ok", "data": "y"}, raw], "s.yaml")
    assert "s.yaml entry 2" in str(info.value)


def test_suite_must_be_a_list_with_unique_names(tmp_path):
    with pytest.raises(SuiteError, match="non-empty YAML list"):
        parse_suite({"name": "a"})
    with pytest.raises(SuiteError, match="two entries are named 'a'"):
        parse_suite([{"name": "a", "data": "x"}, {"name": "a", "data": "y"}])
    with pytest.raises(SuiteError, match="does not exist"):
        load_suite(tmp_path / "none.yaml")


def test_prepare_checks_classnames_and_templates_before_embedding(tmp_path):
    data = str(write_labelled(tmp_path / "d"))
    ok = prepare_suite(parse_suite([{"name": "d", "data": data, "split": "test", "classnames": ["a", "b", "c"],
                                     "templates": ["a {}."]}]))
    assert ok[0].classnames == ["a", "b", "c"] and ok[0].templates == ("a {}.",)
    cases = [({"classnames": "a,b"}, "2 class names given but the dataset has 3"),
             ({"templates": "unknown_set"}, "unknown template set"),
             ({"classnames": ["a", " ", "c"]}, "empty strings"),
             ({"split": "validation"}, "no split 'validation'"),
             ({"task": "retrieval"}, "caption column")]
    for change, match in cases:
        raw = {"name": "d", "data": data, "split": "test", **change}
        with pytest.raises(SuiteError, match=match) as info:
            prepare_suite(parse_suite([raw]))
        assert "suite entry 'd'" in str(info.value)


def test_prepare_reads_clip_benchmark_classname_map(tmp_path):
    data = str(write_labelled(tmp_path / "d"))
    names = tmp_path / "en_classnames.json"
    names.write_text(json.dumps({"d": ["kitten", "puppy", "auto"]}))
    (p,) = prepare_suite(parse_suite([{"name": "d", "data": data, "split": "test", "classnames": f"{names}#d"}]))
    assert p.classnames == ["kitten", "puppy", "auto"]
    with pytest.raises(SuiteError, match="no class names for 'e'"):
        prepare_suite(parse_suite([{"name": "d", "data": data, "split": "test", "classnames": f"{names}#e"}]))


# --------------------------------------------------------------------------------- the CLI


def _two_entry_suite(tmp_path) -> Path:
    (tmp_path / "labelled").mkdir()
    labelled = write_labelled(tmp_path / "labelled")
    (tmp_path / "captions").mkdir()
    captions = write_captions(tmp_path / "captions")
    suite = tmp_path / "suite.yaml"
    suite.write_text(yaml.safe_dump([
        {"name": "labelled", "data": str(labelled), "split": "test", "templates": "simple", "limit": 20},
        {"name": "captions", "data": str(captions), "split": "train", "task": "retrieval",
         "metric": "text_to_image_R@1"},
    ]))
    return suite


def test_benchmark_cli_two_models_with_reference(tiny_clip_dir, tmp_path):
    from distill.benchmark import main

    out = tmp_path / "out"
    report = main(["--model", str(tiny_clip_dir), "--model", str(tiny_clip_dir), "--random-init",
                   "--reference", str(tiny_clip_dir), "--suite", str(_two_entry_suite(tmp_path)),
                   "--out", str(out), "--batch-size", "8", "--no-progress"])
    assert json.loads((out / "benchmark.json").read_text()) == report
    assert [d["name"] for d in report["datasets"]] == ["labelled", "captions"]
    ref, a, b = report["models"]
    assert ref["role"] == "reference" and not ref["random_init"] and a["random_init"]
    kept = [d["name"] for d in report["datasets"] if d["in_mean"]]  # a random tiny model may sit near chance
    assert ref["retention"] == {"labelled": 1.0, "captions": 1.0} and ref["mean_retention"] == (1.0 if kept else None)
    lab = a["results"]["labelled"]
    assert lab["num_images"] == 19 and lab["num_failed_images"] == 1  # limit 20, row 3 is corrupt
    assert lab["score"] == lab["metrics"]["top1"]
    assert a["results"]["captions"]["score"] == a["results"]["captions"]["metrics"]["text_to_image"]["R@1"]
    for name in ("labelled", "captions"):
        expected = a["results"][name]["score"] / ref["results"][name]["score"]
        assert a["retention"][name] == pytest.approx(expected)
    assert a["image_gflops"] > 0
    for row in (ref, a, b):  # every score carries its bootstrap interval
        for result in row["results"].values():
            lo, hi = result["score_interval"]
            assert lo <= result["score"] <= hi
    # paired with itself: no spread (None only where a resample leaves the tiny reference without a hit)
    assert ref["retention_interval"]["labelled"] in ([1.0, 1.0], None)
    assert "difference_to_first_model" not in a and set(b["difference_to_first_model"]) == {"labelled", "captions"}
    md, page = (out / "benchmark.md").read_text(), (out / "benchmark.html").read_text()
    assert "mean % of ref." in md and md.count("\n| ") >= 3
    assert "Paired differences" in md and "bootstrap interval" in md and "Paired differences" in page
    assert page.count("<svg") == 2 and "<script" not in page and "http" not in page.replace(
        'xmlns="http://www.w3.org/2000/svg"', "")


def test_benchmark_fails_on_a_bad_entry_before_loading_models(tmp_path):
    from distill.benchmark import main

    data = write_labelled(tmp_path / "d")
    suite = tmp_path / "s.yaml"
    suite.write_text(yaml.safe_dump([{"name": "d", "data": str(data), "split": "test", "classnames": "a,b"}]))
    with pytest.raises(SuiteError, match="2 class names"):  # the model path does not even exist
        main(["--model", str(tmp_path / "no-model"), "--suite", str(suite), "--out", str(tmp_path / "o")])


@pytest.mark.slow
def test_benchmark_cli_subprocess_on_shared_data(tiny_clip_dir, tmp_path):
    """The real CLI, as a user runs it: a tiny model on two entries of the shared suite."""
    import subprocess
    import sys

    require_shared("cifar10")
    require_shared("coco-mini")
    entries = [e for e in yaml.safe_load((REPO / "suites" / "shared.yaml").read_text())
               if e["name"] in ("cifar10", "coco-mini")]
    for e in entries:
        e["data"] = str((REPO / e["data"]).resolve())
    suite = tmp_path / "two.yaml"
    suite.write_text(yaml.safe_dump(entries))
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "distill.benchmark", "--model", str(tiny_clip_dir),
                           "--reference", str(tiny_clip_dir), "--suite", str(suite), "--out", str(out),
                           "--limit", "64", "--no-progress", "--device", "cpu"],
                          capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    report = json.loads((out / "benchmark.json").read_text())
    assert [d["name"] for d in report["datasets"]] == ["cifar10", "coco-mini"]
    cifar = report["models"][1]["results"]["cifar10"]
    assert cifar["num_images"] == 64 and 0 <= cifar["score"] <= 1
    assert report["datasets"][0]["num_classes"] == 10 and report["datasets"][0]["num_templates"] == 18
    assert report["models"][1]["results"]["coco-mini"]["metrics"]["num_images"] == 64
    kept = [d for d in report["datasets"] if d["in_mean"]]  # a random tiny model may sit under twice chance
    assert report["models"][1]["mean_retention"] == (pytest.approx(1.0) if kept else None)
    assert all(d["left_out"].startswith("the reference scores") for d in report["datasets"] if not d["in_mean"])


# ------------------------------------------------------------------ chance, means, cosine, ceiling


def test_chance_scores():
    from clipcore.metrics import chance_score

    assert chance_score("top1", num_classes=10) == 0.1 and chance_score("top5", num_classes=10) == 0.5
    assert chance_score("top5", num_classes=3) == 1.0 and chance_score("mean_per_class_recall", num_classes=4) == 0.25
    # 2 images with 1 caption each: R@1 1/2 (its caption among 1 of 2 texts), R@5 1 (every text is in the top 5)
    assert chance_score("image_to_text_R@1", captions_per_image=[1, 1]) == 0.5
    assert chance_score("image_to_text_R@5", captions_per_image=[1, 1]) == 1.0
    # 3 images, 5 captions each, 15 texts, R@1: 5/15
    assert chance_score("image_to_text_R@1", captions_per_image=[5, 5, 5]) == pytest.approx(1 / 3)
    # 10 texts; an image with 2 of them misses both in 2 draws with P = 8/10 * 7/9
    assert chance_score("image_to_text_R@2", captions_per_image=[2, 8]) == pytest.approx(
        ((1 - 8 / 10 * 7 / 9) + (1 - 2 / 10 * 1 / 9)) / 2)
    assert chance_score("text_to_image_R@5", captions_per_image=[1] * 20) == 0.25
    with pytest.raises(ValueError, match="number of classes"):
        chance_score("top1", num_classes=0)


def test_means_leave_out_datasets_where_the_reference_is_near_chance():
    from distill.benchmark import add_retention
    from distill.benchmark_report import notes

    datasets = [{"name": "easy", "chance": 0.1}, {"name": "digits", "chance": 0.1}, {"name": "zero", "chance": 0.01}]
    ref = {"role": "reference", "results": {"easy": {"score": 0.6}, "digits": {"score": 0.15}, "zero": {"score": 0.0}}}
    student = {"role": "model", "results": {"easy": {"score": 0.35}, "digits": {"score": 0.6}, "zero": {"score": 0.2}}}
    add_retention([ref, student], datasets)
    # the digit set (reference 15 %, chance 10 %) would read 400 %: listed, not averaged; a zero reference too
    assert [d["in_mean"] for d in datasets] == [True, False, False]
    assert student["retention"]["digits"] == pytest.approx(4.0) and student["retention"]["zero"] is None
    assert student["mean_retention"] == pytest.approx(0.35 / 0.6)
    assert student["above_chance_retention"]["easy"] == pytest.approx(0.25 / 0.5)
    assert student["mean_above_chance_retention"] == pytest.approx(0.5)
    assert ref["mean_retention"] == 1.0 and ref["mean_above_chance_retention"] == 1.0
    said = " ".join(notes({"datasets": datasets, "reference": "r"}))
    assert "digits is left out of the means: the reference scores 15.0 %, under twice chance (20.0 %)" in said
    assert "zero is left out" in said


def test_benchmark_reports_cosine_to_the_reference_and_a_ceiling(tiny_clip_dir, tmp_path):
    from distill.benchmark import main

    from clipcore.testing import make_tiny_clip

    out = tmp_path / "out"
    other = make_tiny_clip(tmp_path / "other", seed=5)  # the same architecture, other weights
    report = main(["--model", str(tiny_clip_dir), "--model", str(other),
                   "--reference", str(tiny_clip_dir), "--ceiling-side", "8", "--suite", str(_two_entry_suite(tmp_path)),
                   "--out", str(out), "--batch-size", "8", "--no-progress"])
    ref, ceiling, same, rand = report["models"]
    assert ceiling["role"] == "ceiling" and ceiling["model"].endswith("at 8 px")
    for name in ("labelled", "captions"):
        assert same["results"][name]["cosine_to_reference"] == pytest.approx(1.0, abs=1e-4)  # the same model
        assert rand["results"][name]["cosine_to_reference"] < 0.99  # other weights: another embedding
        assert ceiling["results"][name]["cosine_to_reference"] < 0.999  # 8 px loses something of 16+ px images
        assert "cosine_to_reference" not in ref["results"][name]
    assert all(0 < d["chance"] <= 1 for d in report["datasets"])
    md = (out / "benchmark.md").read_text()
    assert "(ceiling)" in md and "cos to ref." in md and "mean above-chance % of ref." in md


def test_ceiling_needs_a_reference(tiny_clip_dir, tmp_path):
    from distill.benchmark import main

    with pytest.raises(ValueError, match="--ceiling-side .* --reference"):
        main(["--model", str(tiny_clip_dir), "--ceiling-side", "32", "--suite", str(_two_entry_suite(tmp_path)),
              "--out", str(tmp_path / "o")])


def test_zeroshot_hits_per_metric():
    from distill.benchmark import zeroshot_hits
    from distill.evaluate import EmbeddedImages

    logits = torch.tensor([[3.0, 1.0, 0.0], [0.0, 1.0, 3.0], [1.0, 3.0, 0.0]])
    images = EmbeddedImages(embeddings=torch.zeros(3, 2), labels=torch.tensor([0, 1, 0]),
                            indices=torch.tensor([7, 8, 9]), num_failed=0, seconds=0.0)
    top1 = zeroshot_hits("top1", logits, images)
    assert top1.ids.tolist() == [7, 8, 9] and top1.hits.tolist() == [True, False, False]
    assert zeroshot_hits("top5", logits, images).hits.all()
    assert zeroshot_hits("mean_per_class_recall", logits, images) is None  # weighs classes: no per-image mean
