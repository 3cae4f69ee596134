"""Distil a CLIP-family teacher into a compact student.

    accelerate launch distill/train.py --config configs/default.yaml optim.max_steps=200
    python distill/train.py                      # the default recipe, one process
    torchrun --nproc_per_node 2 distill/train.py # several CPU processes (gloo)

Gradient accumulation: each micro-batch's contrastive and affinity losses see the negatives of
that micro-batch on every process (batch_size x num_processes), not the whole accumulated batch;
accumulation averages gradients of those losses, as open_clip would without its feature cache.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

if __package__ in (None, ""):  # `accelerate launch distill/train.py` runs this file as a script
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from torch.utils.data import DataLoader, Dataset

from distill.cache import TeacherTargetCache, cache_key
from distill.classnames import classnames_for
from distill.config import ConfigError, TrainConfig, dump_config, load_config, to_dict
from distill.data import (DataSpec, ImageDataset, collate, flatten_captions, load_hf_dataset,
                          resolve_columns)
from distill.evaluate import embed_images, zeroshot_eval
from distill.task import DistillTask, TextBank
from distill.teacher import DualEncoder, load_teacher
from distill.templates import get_templates
from distill.zeroshot import build_classifier

log = logging.getLogger("distill.train")
REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_RECIPE = REPO_ROOT / "configs" / "default.yaml"
STATE_FILE = "trainer_state.json"


class NonFiniteLossError(RuntimeError):
    """A loss term became NaN or inf; the message names the step, the term and the last checkpoint."""


# ------------------------------------------------------------------------------------------ data


class TrainImages(Dataset):
    """An :class:`ImageDataset` that replaces an undecodable row by the next decodable one,
    so every process keeps equal batch sizes (the cross-process gather needs them)."""

    def __init__(self, base: ImageDataset, max_tries: int = 16):
        self.base, self.max_tries = base, max_tries

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int) -> dict:
        for attempt in range(self.max_tries):
            item = self.base[(int(index) + attempt) % len(self.base)]
            if item["valid"]:
                item["substituted"] = attempt
                return item
        raise RuntimeError(f"{self.base.name}: rows {index}..{index + self.max_tries - 1} all failed to decode")


def epoch_batches(num_rows: int, batch_size: int, rank: int, world: int, seed: int, epoch: int) -> list[list[int]]:
    """This process's batches for ``epoch``: a seeded permutation cut into equal global batches.

    Determined by (seed, epoch) alone, so a resumed run sees exactly the batches it would have.
    """
    per_step = batch_size * world
    if num_rows < per_step:
        raise ValueError(f"{num_rows} training images < batch_size x processes = {per_step}")
    perm = torch.randperm(num_rows, generator=torch.Generator().manual_seed(seed + 7919 * epoch))
    usable = num_rows - num_rows % per_step
    return perm[:usable].view(-1, world, batch_size)[:, rank].tolist()


@dataclass
class TrainData:
    images: TrainImages
    bank: TextBank
    classnames: list[str] | None
    teacher_images: torch.Tensor | None  # cached (N, K, D) teacher targets, or None to run the teacher online
    cache_hit: bool | None


def _check_path(path: str, what: str) -> None:
    looks_local = path.startswith((".", "/", "~")) or os.sep in path and Path(path).parts[0] in ("..", ".")
    if looks_local and not Path(path).expanduser().exists():
        raise FileNotFoundError(
            f"{what}={path} does not exist. The default recipe reads ../shared/data beside the repo; on a "
            "connected machine pass e.g. teacher.name_or_path=openai/clip-vit-base-patch32 data.train=uoft-cs/cifar10"
        )


@torch.no_grad()
def _teacher_rows(teacher: DualEncoder, ds, columns, batch_size: int, device) -> callable:
    def embed(start: int, end: int):
        sub = ImageDataset(ds.select(range(start, end)), {"teacher": teacher.image_transform}, columns)
        out = torch.zeros(end - start, 1, teacher.embed_dim)
        for batch in DataLoader(sub, batch_size=batch_size, collate_fn=collate):
            if batch["index"].numel():
                out[batch["index"], 0] = teacher.encode_image(batch["pixel_values_teacher"].to(device)).cpu()
        return out.numpy()

    return embed


@torch.no_grad()
def _embed_texts(model: DualEncoder, texts: Sequence[str], batch_size: int = 256) -> torch.Tensor:
    return torch.cat([model.encode_text(list(texts[i : i + batch_size])).cpu() for i in range(0, len(texts), batch_size)])


def build_train_data(cfg: TrainConfig, teacher: DualEncoder, student: DualEncoder, accelerator) -> TrainData:
    """Load the training split, the text bank and (when enabled) the cached teacher targets."""
    _check_path(cfg.data.train, "data.train")
    spec = DataSpec(path=cfg.data.train, split=cfg.data.train_split, image_column=cfg.data.image_column,
                    label_column=cfg.data.label_column, caption_column=cfg.data.caption_column,
                    limit=cfg.data.train_limit, shuffle_seed=cfg.seed if cfg.data.train_limit else None)
    ds = load_hf_dataset(spec)
    cols = resolve_columns(ds, spec)
    names = classnames_for(ds, cols.label, cfg.data.classnames)
    templates = list(get_templates(cfg.data.templates))
    prompts = [t.format(c) for c in names for t in templates] if names else []
    texts, caption_rows = list(prompts), []
    if cols.captions:
        caps, owner = flatten_captions(ds, cols.captions)
        caption_rows = [[] for _ in range(len(ds))]
        for j, row in enumerate(owner):
            caption_rows[row].append(len(prompts) + j)
        texts += caps
    if (cfg.loss.clip_weight > 0 or cfg.loss.interactive_weight > 0) and not cols.captions:
        raise ConfigError(
            f"loss.clip_weight / loss.interactive_weight need image-text pairs, but {spec.label} has no caption "
            f"column (columns: {ds.column_names}); set data.caption_column=... or set those weights to 0"
        )
    if not texts:
        raise ValueError(f"{spec.label}: no class names and no captions; set data.classnames=... or data.caption_column")
    cached, hit, teacher_text = None, None, None
    if cfg.cache.enabled:
        key = cache_key(teacher.fingerprint(), ds._fingerprint, teacher.image_transform.to_json(), cfg.cache.views, cfg.seed)
        store = TeacherTargetCache(cfg.cache.dir, key, accelerator.process_index, accelerator.num_processes,
                                   accelerator.wait_for_everyone)
        targets = store.get_or_build(len(ds), _teacher_rows(teacher, ds, cols, cfg.optim.batch_size, accelerator.device),
                                     texts, lambda t: _embed_texts(teacher, t).numpy())
        cached, hit = torch.from_numpy(targets.images), targets.hit
        teacher_text = torch.from_numpy(targets.texts)
        log.info("teacher-target cache %s: %s", "hit" if hit else "built", targets.path)
    else:
        teacher_text = _embed_texts(teacher, texts)
    ids = mask = None
    if _student_has_text(student):
        tokens = student.tokenize(texts)
        ids, mask = tokens["input_ids"], tokens.get("attention_mask", torch.ones_like(tokens["input_ids"]))
    prompt_rows = torch.arange(len(prompts)).view(len(names), len(templates)) if names else torch.zeros(0, 0, dtype=torch.long)
    bank = TextBank(texts, ids, mask, teacher_text, prompt_rows, caption_rows)
    transforms = {"student": student.image_transform}
    if cached is None:
        transforms["teacher"] = teacher.image_transform
    images = TrainImages(ImageDataset(ds, transforms, cols, name=spec.label))
    return TrainData(images, bank, names, cached, hit)


# ----------------------------------------------------------------------------- optimisation


def build_optimizer(task: torch.nn.Module, cfg) -> torch.optim.Optimizer:
    """AdamW; norms, biases and logit scales (every tensor of rank <= 1) get no weight decay."""
    decay, no_decay = [], []
    for name, p in task.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 or "logit_scale" in name or "log_scale" in name else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps)


def build_scheduler(optimizer, cfg, num_processes: int):
    from transformers import get_cosine_schedule_with_warmup

    # Accelerate's scheduler wrapper steps once per process per optimiser step, so the
    # schedule is laid out in those units to stay a function of optimiser steps.
    return get_cosine_schedule_with_warmup(optimizer, cfg.warmup_steps * num_processes, cfg.max_steps * num_processes)


# ------------------------------------------------------------------------------- checkpoints


def checkpoint_dir(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    done = [p for p in checkpoint_dir(output_dir).glob("step-*") if (p / STATE_FILE).is_file()]
    return max(done, key=lambda p: int(p.name.split("-")[1])) if done else None


def save_checkpoint(accelerator, output_dir: str | Path, state: dict, keep: int) -> Path:
    """``accelerator.save_state`` into a temporary directory, renamed into place when complete.

    A run killed mid-write leaves only a ``.tmp-*`` directory, which ``latest`` ignores.
    """
    root = checkpoint_dir(output_dir)
    final = root / f"step-{state['step']}"
    tmp = root / f".tmp-step-{state['step']}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp), safe_serialization=True)
    if accelerator.is_main_process:
        (tmp / STATE_FILE).write_text(json.dumps(state))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        old = sorted((p for p in root.glob("step-*")), key=lambda p: int(p.name.split("-")[1]))[:-keep]
        for p in old:
            shutil.rmtree(p, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def resolve_resume(resume: str | None, output_dir: str) -> Path | None:
    if not resume:
        return None
    if resume == "latest":
        found = latest_checkpoint(output_dir)
        if found is None:
            log.warning("resume=latest: no checkpoint under %s; starting fresh", checkpoint_dir(output_dir))
        return found
    path = Path(resume)
    if not (path / STATE_FILE).is_file():
        raise FileNotFoundError(f"resume={resume}: not a complete checkpoint (no {STATE_FILE})")
    return path


# ------------------------------------------------------------------------------------ the loop


def _to_device(batch: dict, device, cached: torch.Tensor | None) -> dict:
    out = {k: (v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
    if cached is not None:
        out["teacher_image"] = cached[batch["index"], 0].to(device)  # view 0: the centre crop
    return out


def check_finite(losses: dict, step: int, accelerator, last_checkpoint: Path | None) -> None:
    """Stop on NaN/inf in any loss term; all processes agree so none hangs in a collective."""
    bad = [k for k, v in losses.items() if torch.is_tensor(v) and v.dim() == 0 and not torch.isfinite(v)]
    flag = torch.tensor([1.0 if bad else 0.0], device=accelerator.device)
    if accelerator.reduce(flag, reduction="sum").item() > 0:
        terms = ", ".join(f"{k}={losses[k].item()}" for k in bad) or "on another process"
        raise NonFiniteLossError(
            f"step {step}: non-finite loss ({terms}); stopping without updating the weights. "
            f"Last good checkpoint: {last_checkpoint or 'none yet'}"
        )


def evaluate_student(cfg: TrainConfig, student: DualEncoder, classnames: list[str] | None) -> dict:
    """Zero-shot top-1/top-5 of the student on the held-out split."""
    source = cfg.data.eval or cfg.data.train
    spec = DataSpec(path=source, split=cfg.data.eval_split, image_column=cfg.data.image_column,
                    label_column=cfg.data.label_column, limit=cfg.data.eval_limit,
                    shuffle_seed=cfg.seed if cfg.data.eval_limit else None)
    ds = load_hf_dataset(spec)
    cols = resolve_columns(ds, spec)
    names = classnames or classnames_for(ds, cols.label, cfg.data.classnames)
    if not cols.label or not names:
        return {}
    loader = DataLoader(ImageDataset(ds, {"model": student.image_transform}, cols, name=spec.label),
                        batch_size=cfg.optim.batch_size, collate_fn=collate, num_workers=cfg.data.num_workers)
    was_training = student.training
    images = embed_images(student, loader, progress=False)
    metrics = zeroshot_eval(student, images, names, cfg.data.templates)
    student.train(was_training)
    return {f"eval/zeroshot_{k}": v for k, v in metrics.items() if k in ("top1", "top5", "mean_per_class_recall")}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="distill/train.py", description="Distil a CLIP teacher into a student.")
    p.add_argument("--config", default=None, help=f"YAML recipe (default: {DEFAULT_RECIPE.relative_to(REPO_ROOT)})")
    p.add_argument("--resume", default=None, help="'latest' or a checkpoint directory")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. optim.lr=1e-3 loss.clip_weight=0.5")
    return p.parse_args(argv)


def make_accelerator(cfg: TrainConfig):
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, ProjectConfiguration

    project = ProjectConfiguration(project_dir=cfg.output_dir, logging_dir=str(Path(cfg.output_dir) / "tb"))
    return Accelerator(mixed_precision=cfg.mixed_precision, gradient_accumulation_steps=cfg.optim.grad_accum,
                       cpu=cfg.cpu, log_with="tensorboard", project_config=project,
                       # a zero-weight loss leaves e.g. the logit scale unused in a step
                       kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)])


def _scalar_config(cfg: TrainConfig) -> dict:
    flat = {}

    def walk(prefix, node):
        for k, v in node.items():
            if isinstance(v, dict):
                walk(f"{prefix}{k}.", v)
            elif isinstance(v, (int, float, str, bool)):
                flat[prefix + k] = v
            else:
                flat[prefix + k] = str(v)

    walk("", to_dict(cfg))
    return flat


# ---------------------------------------------------------------------------------------- main


def _load_tokenizer(name_or_path: str | None):
    """A student tokenizer other than the teacher's (teacher and student may differ)."""
    if not name_or_path:
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(name_or_path)


def _student_has_text(student: DualEncoder) -> bool:
    from students.image_only import FrozenTextStudent

    return not isinstance(student, FrozenTextStudent)


def _log_line(step: int, losses: dict, images_per_s: float, lr: float) -> dict:
    logs = {k: float(v.detach()) for k, v in losses.items() if torch.is_tensor(v) and v.dim() == 0}
    logs.update(images_per_s=images_per_s, lr=lr)
    return logs


def train(cfg: TrainConfig) -> dict:
    """Run one distillation; returns the final metrics. See the module docstring."""
    from accelerate.utils import set_seed
    from tqdm.auto import tqdm

    from students import build_student, save_student

    accelerator = make_accelerator(cfg)
    set_seed(cfg.seed)
    out = Path(cfg.output_dir)
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        dump_config(cfg, out / "config.yaml")
    _check_path(cfg.teacher.name_or_path, "teacher.name_or_path")
    torch.manual_seed(cfg.seed + 1)  # a random-init teacher must not equal a same-shape student seeded below
    teacher = load_teacher(cfg.teacher.name_or_path, random_init=cfg.teacher.random_init, device=accelerator.device)
    torch.manual_seed(cfg.seed)  # the student's init must not depend on how the teacher was built
    student = build_student(cfg.student.arch, teacher=teacher, image_size=cfg.student.image_size,
                            init=cfg.student.init, tokenizer=_load_tokenizer(cfg.student.tokenizer))
    data = build_train_data(cfg, teacher, student, accelerator)
    head = None
    if data.classnames and cfg.loss.kl_on_classes:
        head = build_classifier(teacher, data.classnames, cfg.data.templates).to(accelerator.device)
    task = DistillTask(student, teacher, cfg.loss, data.bank, head, cfg.optim.init_logit_scale)
    optimizer = build_optimizer(task, cfg.optim)
    scheduler = build_scheduler(optimizer, cfg.optim, accelerator.num_processes)
    task, optimizer, scheduler = accelerator.prepare(task, optimizer, scheduler)
    accelerator.init_trackers("distill", config=_scalar_config(cfg))

    state = {"step": 0, "epoch": 0, "batch": 0}
    resume = resolve_resume(cfg.resume, cfg.output_dir)
    last_ckpt = resume
    if resume is not None:
        accelerator.load_state(str(resume))
        state = json.loads((resume / STATE_FILE).read_text())
        log.info("resumed from %s at step %d", resume, state["step"])

    accum, bs = cfg.optim.grad_accum, cfg.optim.batch_size
    cached = data.teacher_images
    bar = tqdm(total=cfg.optim.max_steps, initial=state["step"], disable=not (cfg.progress and accelerator.is_local_main_process),
               desc="distill", unit="step")
    metrics: dict = {}
    tick, seen = time.perf_counter(), 0
    task.train()
    while state["step"] < cfg.optim.max_steps:
        batches = epoch_batches(len(data.images), bs, accelerator.process_index, accelerator.num_processes,
                                cfg.seed, state["epoch"])
        usable = len(batches) - len(batches) % accum  # an epoch ends on an optimiser-step boundary
        if usable == 0:
            raise ValueError(f"an epoch has {len(batches)} batches < optim.grad_accum={accum}")
        loader = DataLoader(data.images, batch_sampler=batches[state["batch"]:usable], collate_fn=collate,
                            num_workers=cfg.data.num_workers)
        for batch in loader:
            batch = _to_device(batch, accelerator.device, cached)
            with accelerator.accumulate(task):
                losses = task(batch, step=state["step"] * accum + state["batch"] % accum, seed=cfg.seed)
                check_finite(losses, state["step"], accelerator, last_ckpt)
                accelerator.backward(losses["loss"])
                if accelerator.sync_gradients and cfg.optim.grad_clip > 0:
                    accelerator.clip_grad_norm_(task.parameters(), cfg.optim.grad_clip)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            state["batch"] += 1
            seen += bs * accelerator.num_processes
            if not accelerator.sync_gradients:
                continue
            state["step"] += 1
            bar.update(1)
            if state["step"] % cfg.log_every == 0 or state["step"] == cfg.optim.max_steps:
                rate = seen / max(time.perf_counter() - tick, 1e-9)
                logs = _log_line(state["step"], losses, rate, scheduler.get_last_lr()[0])
                accelerator.log(logs, step=state["step"])
                if accelerator.is_main_process:
                    with open(out / "train_log.jsonl", "a") as f:
                        f.write(json.dumps({"step": state["step"], **logs}) + "\n")
                bar.set_postfix({k: f"{v:.3g}" for k, v in logs.items() if k.endswith("_loss") or k == "images_per_s"})
                tick, seen = time.perf_counter(), 0
            if cfg.eval_every and state["step"] % cfg.eval_every == 0 and state["step"] < cfg.optim.max_steps:
                metrics = _evaluate(cfg, accelerator, task, data)
            if cfg.save_every and state["step"] % cfg.save_every == 0 and state["step"] < cfg.optim.max_steps:
                last_ckpt = save_checkpoint(accelerator, out, _next_position(state, usable), cfg.keep_checkpoints)
            if state["step"] >= cfg.optim.max_steps:
                break
        else:
            state = {"step": state["step"], "epoch": state["epoch"] + 1, "batch": 0}
    bar.close()
    last_ckpt = save_checkpoint(accelerator, out, _next_position(state, usable), cfg.keep_checkpoints)
    metrics = _evaluate(cfg, accelerator, task, data)
    if accelerator.is_main_process:
        final = out / "final"
        save_student(accelerator.unwrap_model(task).student, final)
        dump_config(cfg, final / "training_config.yaml")
        write_model_card(final, cfg, metrics, state["step"])
        (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
        log.info("saved the student to %s", final)
    accelerator.end_training()
    return metrics


def _next_position(state: dict, usable: int) -> dict:
    """The position to resume from: the next batch, rolling over to the next epoch."""
    if state["batch"] >= usable:
        return {"step": state["step"], "epoch": state["epoch"] + 1, "batch": 0}
    return dict(state)


def _evaluate(cfg: TrainConfig, accelerator, task, data: TrainData) -> dict:
    metrics = {}
    if accelerator.is_main_process:
        metrics = evaluate_student(cfg, accelerator.unwrap_model(task).student, data.classnames)
        if metrics:
            accelerator.log(metrics, step=None)
            log.info("eval: %s", {k: round(v, 4) for k, v in metrics.items()})
    accelerator.wait_for_everyone()
    return metrics


def write_model_card(directory: Path, cfg: TrainConfig, metrics: dict, steps: int) -> None:
    rows = "\n".join(f"| {k} | {v:.4f} |" for k, v in metrics.items()) or "| (no evaluation) | |"
    directory.joinpath("README.md").write_text(
        f"""---
library_name: transformers
tags: [clip, knowledge-distillation, zero-shot-image-classification]
---
# Distilled CLIP student `{cfg.student.arch}`

- **Teacher:** `{cfg.teacher.name_or_path}`{" (random weights: a pipeline check, not a useful model)" if cfg.teacher.random_init else ""}
- **Training data:** `{cfg.data.train}` split `{cfg.data.train_split}`{f" (first {cfg.data.train_limit} rows, seeded)" if cfg.data.train_limit else ""}
- **Recipe:** {steps} steps, batch {cfg.optim.batch_size} x {cfg.optim.grad_accum} accumulation, lr {cfg.optim.lr},
  losses: KL {cfg.loss.kl_weight} (T={cfg.loss.kl_temperature}), CLIP {cfg.loss.clip_weight},
  feature {cfg.loss.feature_weight} ({cfg.loss.feature_kind}), interactive {cfg.loss.interactive_weight};
  precision `{cfg.mixed_precision}`. The full resolved config is `training_config.yaml`.

## Zero-shot evaluation (`{cfg.data.eval or cfg.data.train}` split `{cfg.data.eval_split}`, templates `{cfg.data.templates}`)

| metric | value |
|---|---|
{rows}
"""
    )


def main(argv: Sequence[str] | None = None) -> dict:
    """Entry point for ``accelerate launch distill/train.py`` and for tests (``main([...])``)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    overrides = list(args.overrides) + ([f"resume={args.resume}"] if args.resume else [])
    cfg = load_config(args.config or DEFAULT_RECIPE, overrides)
    return train(cfg)


if __name__ == "__main__":
    main()
