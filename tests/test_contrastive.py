"""mode=contrastive: CLIP fine-tuning with locked, partly or fully trainable towers."""

import json

import pytest
import torch
from safetensors.torch import load_file

from clipcore.testing import make_tiny_clip
from distill.train import main
from tests.datagen import write_captions, write_labelled


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("contrastive")
    model = make_tiny_clip(root / "model", seed=3)
    labelled, caps = root / "labelled", root / "caps"
    labelled.mkdir(), caps.mkdir()
    write_labelled(labelled, n=48, tinted=True)
    write_captions(caps, n=16)
    (root / "empty.yaml").write_text("{}\n")
    return root, model, labelled, caps


def _args(setup, tmp_path, *extra):
    root, model, labelled, _ = setup
    return ["--config", str(root / "empty.yaml"), "mode=contrastive", f"contrastive.model={model}",
            f"data.train={labelled}", "optim.batch_size=8", "optim.warmup_steps=1", "log_every=1",
            "progress=false", "optim.lr=3e-3", f"output_dir={tmp_path / 'out'}", f"cache.dir={tmp_path / 'cache'}",
            "data.templates=simple", *extra]


def _changed(before: dict, after_dir) -> set[str]:
    after = load_file(str(after_dir / "model.safetensors"))
    return {k for k, v in after.items() if not torch.equal(before[k], v)}


@pytest.mark.parametrize(
    "freeze, trained_towers",
    [
        (["contrastive.freeze_image=true", "contrastive.freeze_text=true"], set()),
        (["contrastive.freeze_image=true", "contrastive.freeze_text=false"], {"text_model"}),
        (["contrastive.freeze_image=true", "contrastive.unfreeze_image_blocks=1"], {"vision_model.post_layernorm"}),
        (["contrastive.freeze_image=false", "contrastive.freeze_text=false"], {"vision_model", "text_model"}),
    ],
)
def test_locking_trains_only_what_is_unlocked(setup, tmp_path, freeze, trained_towers):
    _, model_dir, _, _ = setup
    before = load_file(str(model_dir / "model.safetensors"))
    main(_args(setup, tmp_path, "optim.max_steps=3", *freeze))
    changed = _changed(before, tmp_path / "out" / "final")
    for prefix in {"visual_projection", "text_projection", "logit_scale"} | trained_towers:  # heads always train
        assert any(k.startswith(prefix) for k in changed), (prefix, sorted(changed)[:8])
    for tower in {"vision_model", "text_model"}:
        if not any(t.startswith(tower) for t in trained_towers):
            assert not any(k.startswith(tower) for k in changed), (tower, sorted(changed)[:8])
    if "contrastive.unfreeze_image_blocks=1" in freeze:  # only the last block of the image tower
        assert not any(k.startswith("vision_model.encoder.") for k in changed)
    log = [json.loads(line) for line in (tmp_path / "out" / "train_log.jsonl").read_text().splitlines()]
    assert len(log) == 3 and all("clip_loss" in r for r in log)


def test_lit_heads_fit_labelled_data_and_cache_is_reused(setup, tmp_path):
    main(_args(setup, tmp_path, "optim.max_steps=30"))
    log = [json.loads(line) for line in (tmp_path / "out" / "train_log.jsonl").read_text().splitlines()]
    first, last = (sum(r["loss"] for r in rows) / 5 for rows in (log[:5], log[-5:]))
    assert last < 0.8 * first, (first, last)
    entries = sorted((tmp_path / "cache").glob("towers-*/meta.json"))
    assert len(entries) == 2  # image-tower and text-tower features
    stamps = [e.stat().st_mtime for e in entries]
    main(_args(setup, tmp_path, "optim.max_steps=2", f"output_dir={tmp_path / 'again'}"))
    assert sorted((tmp_path / "cache").glob("towers-*/meta.json")) == entries
    assert [e.stat().st_mtime for e in entries] == stamps  # hits: not rebuilt


def test_captions_and_synonym_prompts(setup, tmp_path):
    root, _, labelled, caps = setup
    main(_args(setup, tmp_path, f"data.train={caps}", "data.eval_split=train", "optim.max_steps=2"))
    names = tmp_path / "syn.json"
    names.write_text(json.dumps({"cat": "cat, kitty", "dog": "dog, puppy, hound", "car": "car, automobile"}))
    main(_args(setup, tmp_path, f"data.classnames={names}", "optim.max_steps=2", f"output_dir={tmp_path / 'syn'}"))
    card = (tmp_path / "syn" / "final" / "README.md").read_text()
    assert "eval/zeroshot_top1" in card


def test_contrastive_needs_a_model(setup, tmp_path):
    from distill.config import ConfigError

    with pytest.raises(ConfigError, match="contrastive.model"):
        main(_args(setup, tmp_path, "contrastive.model="))
