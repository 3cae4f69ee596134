"""Distil a tower teacher's text side into a small text student, on texts alone.

    python -m distill.text_student --config configs/text_student.yaml
    python -m distill.text_student --config configs/text_student.yaml optim.max_steps=500 pair_with=outputs/general/final

The student (``student.arch``, a registered text student) starts from the teacher's own layers
(:mod:`students.text_student`). Each step embeds a batch of the corpus (:mod:`distill.text_corpus`)
and matches the teacher's cached text embeddings: their cosine, and their distributions over a
fixed bank of the teacher's image embeddings (:mod:`clipcore.text_losses`). Teacher text and image
embeddings are computed once and cached (``cache.dir``), the images under the same keys as the
general student's runs, so their entries are reused. Writes ``output_dir/final`` (a text student:
``students.load_text_student``), ``train_log.jsonl`` and ``metrics.json``; with ``pair_with``, also
``output_dir/pair``, the image model paired with the student, which ``python -m distill.benchmark``
measures like any model.
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

import torch
import torch.nn.functional as F

from clipcore.augment import ViewSpec
from clipcore.data import DataSpec, load_hf_dataset, resolve_columns
from clipcore.loading import load_teacher
from clipcore.losses import total_loss
from clipcore.text_losses import TextDistillLoss
from distill.cli import debug_requested, run_cli
from distill.config import dump_config
from distill.mixture import _source_targets, _text_targets  # the general runs' cache keys, reused as they are
from distill.text_config import TextJobConfig, load_text_config
from distill.text_corpus import TextCorpus, build_corpus, tokenizer_words
from distill.train_data import check_path
from students import build_text_student, get_student_config, save_pair, save_text_student
from students.text_student import TextStudent

log = logging.getLogger("distill.text_student")
EMBED_BATCH = 256  # texts per forward pass when the student embeds without gradients


@dataclass
class LocalProcess:
    """The one process of this job, with the attributes the cache builders read from an Accelerator."""

    device: torch.device
    process_index: int = 0
    num_processes: int = 1

    def wait_for_everyone(self) -> None:
        pass


# ------------------------------------------------------------------------------------ targets


def image_bank(cfg: TextJobConfig, teacher, proc: LocalProcess) -> torch.Tensor:
    """(N, D) normalised teacher image embeddings of ``bank.sources``.

    Each source is embedded in full and its seeded subset taken afterwards: the cache entry is then
    the one the general student's runs wrote for the same dataset (a subset would be another key).
    """
    parts = []
    for i, src in enumerate(cfg.bank.sources):
        check_path(src.path, f"bank.sources[{i}].path")
        spec = DataSpec(path=src.path, split=src.split)
        ds = load_hf_dataset(spec)
        views = ViewSpec(views=cfg.cache.views, seed=cfg.seed)
        rows = _source_targets(cfg.cache, teacher, ds, resolve_columns(ds, spec).image, proc, views=views,
                               batch_size=64)[: len(ds), 0]  # view-major: the first len(ds) rows are the plain images
        rows = rows[rows.norm(dim=-1) > 0]  # rows that failed to decode are stored as zeros
        if src.limit is not None and src.limit < len(rows):
            pick = torch.randperm(len(rows), generator=torch.Generator().manual_seed(cfg.seed + i))[: src.limit]
            rows = rows[pick.sort().values]
        log.info("image bank: %d teacher image embeddings of %s (%s)", len(rows), src.path, src.split)
        parts.append(rows)
    return F.normalize(torch.cat(parts).float(), dim=-1) if parts else torch.zeros(0, teacher.embed_dim)


def text_targets(cfg: TextJobConfig, teacher, texts: list[str], proc: LocalProcess) -> torch.Tensor:
    """(M, D) normalised teacher text embeddings, cached under the teacher and the texts."""
    return F.normalize(_text_targets(cfg.cache, teacher, texts, proc).float(), dim=-1)


# --------------------------------------------------------------------------------- validation


@torch.no_grad()
def embed(student: TextStudent, texts: Sequence[str]) -> torch.Tensor:
    was_training = student.training
    student.eval()
    out = torch.cat([student.encode_text(list(texts[i : i + EMBED_BATCH])).cpu()
                     for i in range(0, len(texts), EMBED_BATCH)])
    student.train(was_training)
    return out


def head_agreement(student_emb: torch.Tensor, teacher_emb: torch.Tensor, classes: int, bank: torch.Tensor) -> float:
    """Top-1 agreement on the bank's images between the zero-shot heads the two build from the same
    prompts (per class: normalise, average over templates, renormalise; OpenAI's recipe)."""
    def head(emb: torch.Tensor) -> torch.Tensor:
        return F.normalize(F.normalize(emb, dim=-1).view(classes, -1, emb.shape[-1]).mean(1), dim=-1)

    return float(((bank @ head(student_emb).t()).argmax(1) == (bank @ head(teacher_emb).t()).argmax(1)).float().mean())


def validate(student: TextStudent, corpus: TextCorpus, targets: torch.Tensor, bank: torch.Tensor) -> dict[str, float]:
    """Cosine to the teacher on the held-out texts (prompts of unseen names, tuning captions), and
    the agreement of the heads built from the unseen names' prompts."""
    emb = embed(student, corpus.val)
    cos = (emb * targets).sum(-1)
    n = corpus.val_prompts
    metrics = {"val/cosine": float(cos.mean())}
    if n:
        metrics["val/prompt_cosine"] = float(cos[:n].mean())
    if len(cos) > n:
        metrics["val/caption_cosine"] = float(cos[n:].mean())
    if n and len(bank):
        metrics["val/head_agreement"] = head_agreement(emb[:n], targets[:n], len(corpus.val_names), bank)
    return metrics


# ----------------------------------------------------------------------------------- training


def lr_factor(step: int, warmup: int, total: int) -> float:
    """Linear warm-up, then a cosine decay to zero."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(total - warmup, 1)))


def batches(n: int, batch_size: int, seed: int):
    """Endless seeded epochs of ``batch_size`` indices; the last, short batch of an epoch is dropped."""
    epoch = 0
    while True:
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch))
        for start in range(0, n - batch_size + 1, batch_size):
            yield order[start : start + batch_size]
        epoch += 1


def optimizer_for(student: TextStudent, cfg: TextJobConfig) -> torch.optim.Optimizer:
    # no weight decay on LayerNorms and biases (1-d tensors), as in BERT's own recipe
    params = [p for p in student.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() > 1], "weight_decay": cfg.optim.weight_decay},
              {"params": [p for p in params if p.dim() <= 1], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.optim.lr)


def train_loop(cfg: TextJobConfig, student: TextStudent, corpus: TextCorpus, train_t: torch.Tensor,
               val_t: torch.Tensor, bank: torch.Tensor, scale: float, out: Path) -> dict[str, float]:
    loss_fn = TextDistillLoss(cfg.loss.feature_weight, cfg.loss.affinity_weight, cfg.loss.temperature)
    opt = optimizer_for(student, cfg)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: lr_factor(s, cfg.optim.warmup_steps, cfg.optim.max_steps))
    device = student.device
    bank_d = bank.to(device)
    stream = batches(len(corpus.train), min(cfg.optim.batch_size, len(corpus.train)), cfg.seed)
    start = time.perf_counter()
    with open(out / "train_log.jsonl", "a") as log_file:
        for step in range(1, cfg.optim.max_steps + 1):
            idx = next(stream)
            tokens = {k: v.to(device) for k, v in student.tokenize([corpus.train[i] for i in idx]).items()}
            losses = loss_fn(student_text=student.text_features(tokens["input_ids"], tokens["attention_mask"]),
                             teacher_text=train_t[idx].to(device), image_bank=bank_d, teacher_scale=scale)
            loss = total_loss(losses)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"step {step}: the loss is {loss.item()} ({ {k: float(v) for k, v in losses.items()} })")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(student.parameters(), cfg.optim.grad_clip)
            opt.step()
            sched.step()
            row = None
            if step % cfg.log_every == 0 or step == 1:
                row = {"step": step, "loss": loss.item(), **{k: v.item() for k, v in losses.items()},
                       "lr": sched.get_last_lr()[0], "seconds": round(time.perf_counter() - start, 2)}
            if cfg.eval_every and step % cfg.eval_every == 0 and step != cfg.optim.max_steps:
                row = {**(row or {"step": step}), **validate(student, corpus, val_t, bank)}
            if row is not None:
                log_file.write(json.dumps(row) + "\n")
                log_file.flush()
                log.info("%s", " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))
    metrics = validate(student, corpus, val_t, bank)
    metrics["train/seconds"] = round(time.perf_counter() - start, 2)
    metrics["train/steps"] = cfg.optim.max_steps
    return metrics


def save_final(cfg: TextJobConfig, student: TextStudent, teacher, metrics: dict, out: Path) -> Path:
    """``out/final`` written into a temporary directory and renamed into place (never half-written)."""
    final, tmp = out / "final", out / ".tmp-final"
    shutil.rmtree(tmp, ignore_errors=True)
    save_text_student(student, tmp, teacher=teacher)
    dump_config(cfg, tmp / "training_config.yaml")
    (tmp / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    return final


def write_pair(image_dir: str, final: Path, out: Path) -> Path:
    pair, tmp = out / "pair", out / ".tmp-pair"
    shutil.rmtree(tmp, ignore_errors=True)
    save_pair(image_dir, final, tmp)
    shutil.rmtree(pair, ignore_errors=True)
    os.replace(tmp, pair)
    return pair


def run(cfg: TextJobConfig) -> dict[str, float]:
    """The whole job; returns the final validation metrics."""
    torch.manual_seed(cfg.seed)
    proc = LocalProcess(torch.device(cfg.device))
    check_path(cfg.teacher, "teacher")
    if cfg.pair_with:
        check_path(cfg.pair_with, "pair_with")
    arch = get_student_config(cfg.student.arch)  # an unknown name fails before any data is read
    teacher = load_teacher(cfg.teacher, device=proc.device)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    words = tokenizer_words(teacher.tokenizer.get_vocab(), cfg.corpus.word_min_length) if cfg.corpus.words else []
    corpus = build_corpus(cfg.corpus, cfg.seed, words)
    train_t, val_t = text_targets(cfg, teacher, corpus.train, proc), text_targets(cfg, teacher, corpus.val, proc)
    bank = image_bank(cfg, teacher, proc)
    student = build_text_student(arch, teacher, init=cfg.student.init).to(proc.device)
    params = sum(p.numel() for p in student.parameters())
    log.info("student %s: %.2fM parameters; teacher %s", arch.name, params / 1e6, teacher.name)
    scale = float(teacher.logit_scale)
    before = validate(student, corpus, val_t, bank)
    log.info("before training: %s", before)
    metrics = {**{f"init/{k.split('/', 1)[1]}": v for k, v in before.items()},
               **train_loop(cfg, student, corpus, train_t, val_t, bank, scale, out), "parameters": params}
    final = save_final(cfg, student.eval(), teacher, metrics, out)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    log.info("wrote %s: %s", final, metrics)
    if cfg.pair_with:
        log.info("wrote %s", write_pair(cfg.pair_with, final, out))
    return metrics


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m distill.text_student", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=None, help="YAML recipe, e.g. configs/text_student.yaml")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. optim.max_steps=500")
    p.add_argument("--debug", action="store_true", help="print the traceback of an error (also: CLIP_DISTILL_DEBUG=1)")
    return p


def main(argv: Sequence[str] | None = None) -> dict[str, float]:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    for name in ("distill", "students"):
        logging.getLogger(name).setLevel(logging.INFO)
    args = build_parser().parse_args(argv)
    return run(load_text_config(args.config, args.overrides))


def cli(argv: Sequence[str] | None = None) -> int:
    """Exit 0 done, 1 failed (e.g. a non-finite loss), 2 bad input (config, paths, models)."""
    return run_cli(lambda: main(argv), debug_requested(argv), failed=(FloatingPointError,))


if __name__ == "__main__":
    sys.exit(cli())
