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
import os
import shutil
import sys
import time
import uuid
from contextlib import nullcontext
from pathlib import Path
from typing import Sequence

if __package__ in (None, ""):  # `accelerate launch distill/train.py` runs this file as a script
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from torch.utils.data import DataLoader

from clipcore.augment import MixSpec, StudentJitter
from clipcore.classnames import classnames_for
from clipcore.data import DataSpec, ImageDataset, collate, load_hf_dataset, resolve_columns
from clipcore.dual_encoder import DualEncoder
from clipcore.loading import load_teacher
from clipcore.metrics import NonFiniteError
from clipcore.zeroshot import build_classifier
from distill.checkpoint import (RunInfo, load_state, read_manifest, resolve_resume, save_checkpoint,
                               set_aside_other_runs)
from distill.cli import debug_requested, run_cli
from distill.config import ConfigError, TrainConfig, dump_config, load_config, to_dict
from distill.contrastive import build_contrastive
from distill.evaluate import embed_images, zeroshot_eval
from distill.rundir import LOG_FILE, RunLock, check_fresh_start, check_resumable, clear_outputs, truncate_log
from distill.task import DistillTask, TrainingTask
from distill.tower_hint import TowerHint, student_image_head
from distill.feed import make_feeder
from distill.stream_data import build_stream_data, is_stream
from distill.mixture import build_mixture_data
from distill.train_data import TrainData, build_train_data, check_path, is_mixture
from exports.pipeline import export_and_check
from distill.final import save_final
from distill.student_init import (attach_qat, finish_qat, initial_student, qat_checkpoint_writer, qat_self_reference,
                                  restore_qat_ranges, set_teacher_mean_share, with_text_student)
from distill.ema import attach_ema, checkpoint_writers
# NonFiniteLossError and NonFiniteWeightsError are imported from here by callers and tests
from distill.divergence import (  # noqa: F401
    NonFiniteLossError,
    NonFiniteWeightsError,
    check_finite,
    check_student_finite,
    check_weights_finite,
)

log = logging.getLogger("distill.train")
REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_RECIPE = REPO_ROOT / "configs" / "default.yaml"


class ParityGateError(RuntimeError):
    """An exported variant failed its parity gate (``export.fail_on_gate``); exit status 1."""


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


# ------------------------------------------------------------------------------------ the loop


def evaluate_student(cfg: TrainConfig, student: DualEncoder, classnames: list[str] | None) -> dict:
    """Zero-shot top-1/top-5 of the student on the held-out split.

    When ``data.eval`` names another dataset than ``data.train``, its columns are detected anew
    and its class names come from its own labels (or ``data.eval_classnames``).
    """
    other = _other_eval_data(cfg)
    spec = eval_spec(cfg, cfg.data.eval_limit)
    ds = load_hf_dataset(spec)
    cols = resolve_columns(ds, spec)
    if other or cfg.data.eval_classnames:
        names = classnames_for(ds, cols.label, cfg.data.eval_classnames)
    else:
        names = classnames or classnames_for(ds, cols.label, cfg.data.classnames)
    if not cols.label or not names:
        return {}
    loader = DataLoader(ImageDataset(ds, {"model": student.image_transform}, cols, name=spec.label),
                        batch_size=cfg.optim.batch_size, collate_fn=collate, num_workers=cfg.data.num_workers)
    was_training = student.training
    images = embed_images(student, loader, progress=False)
    metrics = zeroshot_eval(student, images, names, cfg.data.eval_templates or cfg.data.templates)
    student.train(was_training)
    return {f"eval/zeroshot_{k}": v for k, v in metrics.items() if k in ("top1", "top5", "mean_per_class_recall")}


def _other_eval_data(cfg: TrainConfig) -> bool:
    return bool(cfg.data.eval) and cfg.data.eval != cfg.data.train


def eval_spec(cfg: TrainConfig, limit: int | None) -> DataSpec:
    """The held-out split: ``data.eval`` (or the training source), a seeded subset of ``limit`` rows."""
    other = _other_eval_data(cfg)
    return DataSpec(path=cfg.data.eval or cfg.data.train, split=cfg.data.eval_split,
                    image_column=None if other else cfg.data.image_column,
                    label_column=None if other else cfg.data.label_column, limit=limit,
                    shuffle_seed=cfg.seed if limit else None)


def export_student(cfg: TrainConfig, teacher: DualEncoder, student: DualEncoder, out: Path,
                   reference: DualEncoder | None = None) -> bool:
    """``export.enabled``: ONNX variants, parity report against the teacher, edge bundle. Returns passed.
    ``reference``: the torch model agreement is measured against, if not ``student`` (qat.target=self)."""
    names = cfg.data.eval_classnames if (_other_eval_data(cfg) or cfg.data.eval_classnames) else cfg.data.classnames
    # final/ now holds this run's student: an earlier export certifies another one, and must not
    # survive beside it even if this export fails (the new one is renamed into place whole)
    shutil.rmtree(out / "export", ignore_errors=True)
    result = export_and_check(teacher, student, eval_spec(cfg, cfg.export.parity_limit), out / "export",
                              variants=cfg.export.variants,
                              templates=cfg.data.eval_templates or cfg.data.templates, classnames=names,
                              bundle_precision=cfg.export.bundle_precision, gates=cfg.export.gates,
                              calibration=calibration_spec(cfg),
                              calibration_limit=cfg.export.calibration_limit, bundle_text=cfg.export.bundle_text,
                              reference=reference, int8_float_layers=cfg.export.int8_float_layers)
    log.info("parity %s; report: %s%s\n%s", "PASSED" if result.passed else "FAILED", result.report_paths["html"],
             f"; edge bundle: {result.bundle}" if result.bundle else "", result.summary)
    return result.passed


def calibration_spec(cfg: TrainConfig) -> DataSpec:
    """Static int8 calibrates on seeded training images: of ``data.train``, or a mixture's first source."""
    if isinstance(cfg.data.train, str):
        return DataSpec(path=cfg.data.train, split=cfg.data.train_split, shuffle_seed=cfg.seed)
    first = cfg.data.train[0]
    return DataSpec(path=first.path, split=first.split, shuffle_seed=cfg.seed)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="distill/train.py", description="Distil a CLIP teacher into a student.")
    p.add_argument("--config", default=None, help=f"YAML recipe (default: {DEFAULT_RECIPE.relative_to(REPO_ROOT)})")
    p.add_argument("--resume", default=None, help="'latest' or a checkpoint directory")
    p.add_argument("--debug", action="store_true", help="print the traceback of an error (also: CLIP_DISTILL_DEBUG=1)")
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


def set_cpu_threads(cfg: TrainConfig, accelerator) -> int | None:
    """Intra-op threads of a CPU process. ``accelerate launch`` exports OMP_NUM_THREADS=1 unless given
    --num_cpu_threads_per_process, which leaves all but one core idle in a one-process CPU run
    (resnet-cifar-m forward + backward: 323 images/s on 1 thread, 729 on 2 here); so the cores are
    shared out over the local processes unless cpu_threads is set."""
    if accelerator.device.type != "cpu":
        return None
    local = int(os.environ.get("LOCAL_WORLD_SIZE", accelerator.num_processes))
    threads = cfg.cpu_threads or max(1, len(os.sched_getaffinity(0)) // max(1, local))
    if threads != torch.get_num_threads():
        log.info("CPU threads per process: %d (was %d)", threads, torch.get_num_threads())
        torch.set_num_threads(threads)
    return threads


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


def build_distill(cfg: TrainConfig, accelerator) -> tuple[DistillTask, TrainData]:
    """Teacher, student, data and the distillation task for ``mode: distill``."""
    check_path(cfg.teacher.name_or_path, "teacher.name_or_path")
    torch.manual_seed(cfg.seed + 1)  # a random-init teacher must not equal a same-shape student seeded below
    teacher = load_teacher(cfg.teacher.name_or_path, random_init=cfg.teacher.random_init, device=accelerator.device)
    torch.manual_seed(cfg.seed)  # the student's init must not depend on how the teacher was built
    student = initial_student(cfg, teacher, tokenizer=_load_tokenizer(cfg.student.tokenizer))
    set_teacher_mean_share(cfg, teacher, student)  # before any copy of it (QAT's self reference, an EMA)
    if cfg.export.enabled:
        with_text_student(cfg, student)  # a missing or mismatched export.text_student fails now, not after training
    if cfg.loss.tower_weight > 0:
        student_image_head(student)  # a student without one fails now, not after the teacher's passes
    reference = qat_self_reference(cfg, student)  # before attach_qat folds the student's batch norms
    qat = attach_qat(cfg, student)
    if is_mixture(cfg.data):  # image-only: several sources, a vocabulary
        data = build_mixture_data(cfg.data, cfg.cache, teacher, student, accelerator, seed=cfg.seed,
                                  batch_size=cfg.optim.batch_size, tower_targets=cfg.loss.tower_weight > 0,
                                  loss=cfg.loss)
    else:
        build = build_stream_data if is_stream(cfg.data) else build_train_data  # shards / `datasets` streaming
        data = build(cfg.data, cfg.cache, cfg.loss, teacher, student, accelerator, seed=cfg.seed,
                     batch_size=cfg.optim.batch_size)
    head = None
    if data.classnames and cfg.loss.kl_on_classes:
        head = (data.class_head if data.class_head is not None
                else build_classifier(teacher, data.classnames, cfg.data.templates)).to(accelerator.device)
    jitter = StudentJitter(cfg.data.student_flip, cfg.data.student_shift, cfg.data.student_lowres,
                           cfg.data.student_lowres_min, lowres_rows=data.student_lowres)
    mix = MixSpec(cfg.data.mix.share, cfg.data.mix.cutmix)
    hint = TowerHint(student, data.teacher_towers) if cfg.loss.tower_weight > 0 else None
    task = DistillTask(student, teacher, cfg.loss, data.bank, head, jitter, mix, self_reference=reference,
                       tower_hint=hint, qat_cfg=cfg.qat)
    if cfg.qat.consistency > 0 and cfg.qat.consistency_on == "classes" and head is None:
        raise ConfigError("qat.consistency_on=classes compares class distributions over the class KL's vocabulary: "
                          "set data.vocabulary (or data.classnames) and loss.kl_on_classes=true, or use "
                          "qat.consistency_on=embedding")
    task.qat = qat  # removed before the student is saved (finish_qat)
    if qat is not None and qat.range_module is not None:
        task.qat_ranges = qat.range_module  # qat.ranges=learned: the optimiser (built over the task) trains them
    return task, data


def build_task(cfg: TrainConfig, accelerator):
    """The trainable task module and its training rows, for either mode."""
    if cfg.mode == "contrastive":
        check_path(cfg.data.train, "data.train")
        torch.manual_seed(cfg.seed)
        task, rows, classnames = build_contrastive(cfg, accelerator)
        return task, TrainData(rows, None, classnames)
    return build_distill(cfg, accelerator)


def _log_line(step: int, losses: dict, images_per_s: float, lr: float) -> dict:
    logs = {k: float(v.detach()) for k, v in losses.items() if torch.is_tensor(v) and v.dim() == 0}
    logs.update(images_per_s=images_per_s, lr=lr)
    return logs


def start_run(cfg: TrainConfig, accelerator) -> tuple[RunInfo, Path | None]:
    """This run's id and recorded config, and the verified checkpoint it resumes (None: a fresh run).

    Every process checks (read-only) so that all refuse together; only the main one deletes.
    """
    out, config = Path(cfg.output_dir), to_dict(cfg)
    resume = resolve_resume(cfg.resume, out)
    if resume is not None:
        manifest = read_manifest(resume)
        check_resumable(resume, manifest, config)
        run = RunInfo(manifest["run_id"], config)
    else:
        check_fresh_start(out, config, cfg.overwrite)
        run = RunInfo(uuid.uuid4().hex, config)  # only the main process's id is written
    accelerator.wait_for_everyone()  # every process has found its checkpoint before any is moved
    if accelerator.is_main_process:
        if resume is None and cfg.overwrite:
            clear_outputs(out)
        set_aside_other_runs(out, run.run_id)  # checkpoints/step-* is now this run's alone
    accelerator.wait_for_everyone()
    return run, resume


def train(cfg: TrainConfig) -> dict:
    """Run one distillation; returns the final metrics. See the module docstring.

    The main process holds ``output_dir``'s lock for the whole run (distill/rundir.py).
    """
    accelerator = make_accelerator(cfg)
    with RunLock(cfg.output_dir) if accelerator.is_main_process else nullcontext():
        return _train(cfg, accelerator)


def _train(cfg: TrainConfig, accelerator) -> dict:
    from accelerate.utils import set_seed
    from tqdm.auto import tqdm

    set_cpu_threads(cfg, accelerator)
    set_seed(cfg.seed)
    out = Path(cfg.output_dir)
    run, resume = start_run(cfg, accelerator)
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        dump_config(cfg, out / "config.yaml")
    task, data = build_task(cfg, accelerator)
    optimizer = build_optimizer(task, cfg.optim)
    scheduler = build_scheduler(optimizer, cfg.optim, accelerator.num_processes)
    task, optimizer, scheduler = accelerator.prepare(task, optimizer, scheduler)
    accelerator.init_trackers("distill", config=_scalar_config(cfg))

    qat = getattr(accelerator.unwrap_model(task), "qat", None)  # QAT's handle, or None
    live = accelerator.unwrap_model(task).export_student()
    ema = attach_ema(cfg.optim.ema_decay, live)  # None unless optim.ema_decay > 0
    kept = live if ema is None else ema.student  # what is evaluated, saved and exported
    state = {"step": 0, "epoch": 0, "batch": 0}
    last_ckpt = resume
    if resume is not None:
        accelerator.load_state(str(resume))
        restore_qat_ranges(qat, resume)
        if ema is not None:
            ema.load(resume)
        state = load_state(resume)
        log.info("resumed from %s at step %d", resume, state["step"])
    if accelerator.is_main_process:  # the steps logged after the checkpoint run again: no repeated rows
        truncate_log(out / LOG_FILE, state["step"])

    extra = checkpoint_writers(qat_checkpoint_writer(qat), None if ema is None else ema.save)
    accum, bs = cfg.optim.grad_accum, cfg.optim.batch_size
    feeder = make_feeder(cfg, data, accelerator)  # before the clock starts: it may decode the images once
    bar = tqdm(total=cfg.optim.max_steps, initial=state["step"], disable=not (cfg.progress and accelerator.is_local_main_process),
               desc="distill", unit="step")
    metrics: dict = {}
    tick, seen = time.perf_counter(), 0
    task.train()
    usable = None  # batches per epoch, once an epoch starts
    while state["step"] < cfg.optim.max_steps:
        loader, usable = feeder.epoch(state, accum)
        for batch in loader:
            batch = feeder.to_device(batch)
            with accelerator.accumulate(task):
                losses = task(batch, step=state["step"] * accum + state["batch"] % accum, seed=cfg.batch_seed)
                check_finite(losses, state["step"], accelerator, last_ckpt)
                accelerator.backward(losses["loss"])
                if accelerator.sync_gradients and cfg.optim.grad_clip > 0:
                    accelerator.clip_grad_norm_(task.parameters(), cfg.optim.grad_clip)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                if accelerator.sync_gradients:
                    accelerator.unwrap_model(task).clamp_logit_scale_()
                    if ema is not None:
                        ema.update(live)
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
                    with open(out / LOG_FILE, "a") as f:
                        f.write(json.dumps({"step": state["step"], **logs}) + "\n")
                bar.set_postfix({k: f"{v:.3g}" for k, v in logs.items() if k.endswith("_loss") or k == "images_per_s"})
                tick, seen = time.perf_counter(), 0
            if cfg.eval_every and state["step"] % cfg.eval_every == 0 and state["step"] < cfg.optim.max_steps:
                check_weights_finite(task, state["step"], last_ckpt)
                metrics = _evaluate(cfg, accelerator, kept, data, state["step"])
            if cfg.save_every and state["step"] % cfg.save_every == 0 and state["step"] < cfg.optim.max_steps:
                check_weights_finite(task, state["step"], last_ckpt)
                check_student_finite(kept, state["step"], last_ckpt)
                last_ckpt = save_checkpoint(accelerator, out, _next_position(state, usable), cfg.keep_checkpoints, run, extra)
            if state["step"] >= cfg.optim.max_steps:
                break
        else:
            state = {"step": state["step"], "epoch": state["epoch"] + 1, "batch": 0}
    bar.close()
    feeder.close()
    check_weights_finite(task, state["step"], last_ckpt)
    check_student_finite(kept, state["step"], last_ckpt)
    if usable is not None:  # else a resume at optim.max_steps: its checkpoint is already this state
        last_ckpt = save_checkpoint(accelerator, out, _next_position(state, usable), cfg.keep_checkpoints, run, extra)
    finish_qat(qat)
    metrics = _evaluate(cfg, accelerator, kept, data, state["step"])
    if accelerator.is_main_process:
        final = save_final(cfg, kept, out, metrics, state["step"])
        log.info("saved the student to %s", final)
        if cfg.export.enabled:
            unwrapped: TrainingTask = accelerator.unwrap_model(task)
            fp32_self = unwrapped.agreement_reference()
            metrics["export/parity_passed"] = export_student(
                cfg, unwrapped.parity_reference(), with_text_student(cfg, kept), out,
                reference=None if fp32_self is None else with_text_student(cfg, fp32_self))
        (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    accelerator.wait_for_everyone()  # `final/` exists for every process once train() returns
    accelerator.end_training()
    if cfg.export.fail_on_gate and metrics.get("export/parity_passed") is False:
        raise ParityGateError(f"an exported variant failed its parity gate: see {out / 'export' / 'parity.md'} "
                              "(the student itself is saved; export.fail_on_gate=false ignores the gates)")
    return metrics


def _next_position(state: dict, usable: int) -> dict:
    """The position to resume from: the next batch, rolling over to the next epoch."""
    if state["batch"] >= usable:
        return {"step": state["step"], "epoch": state["epoch"] + 1, "batch": 0}
    return dict(state)


def _evaluate(cfg: TrainConfig, accelerator, student: DualEncoder, data: TrainData, step: int) -> dict:
    metrics = {}
    if accelerator.is_main_process:
        metrics = evaluate_student(cfg, student, data.classnames)
        if metrics:
            # at the training step, so TensorBoard draws a curve (step=None put every evaluation at 0)
            accelerator.log(metrics, step=step)
            log.info("eval: %s", {k: round(v, 4) for k, v in metrics.items()})
    accelerator.wait_for_everyone()
    return metrics


def main(argv: Sequence[str] | None = None) -> dict:
    """Entry point for ``accelerate launch distill/train.py`` and for tests (``main([...])``)."""
    # our loggers at INFO; libraries (onnxruntime's quantizer logs every tensor at INFO) at WARNING
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for name in ("clipcore", "distill", "exports", "students"):
        logging.getLogger(name).setLevel(logging.INFO)
    args = parse_args(argv)
    overrides = list(args.overrides) + ([f"resume={args.resume}"] if args.resume else [])
    cfg = load_config(args.config or DEFAULT_RECIPE, overrides)
    build_prerequisite(cfg)
    return train(cfg)


def build_prerequisite(cfg: TrainConfig) -> None:
    """Build the teacher (distill) or starting model (contrastive) first when a recipe makes it.

    The reference teacher is such a case: the default job distils it, and a fresh checkout has
    not built it yet. The build is an ordinary training run of its own recipe, in this process.
    """
    path, recipe = ((cfg.teacher.name_or_path, cfg.teacher.build_recipe) if cfg.mode == "distill"
                    else (cfg.contrastive.model, cfg.contrastive.build_recipe))
    if not recipe or Path(path).exists():
        return
    if not Path(recipe).is_file():
        raise FileNotFoundError(f"{path} does not exist and its build recipe {recipe} is not a file")
    log.info("%s does not exist yet: building it first with `python distill/train.py --config %s`", path, recipe)
    main(["--config", recipe])
    if not Path(path).exists():
        raise FileNotFoundError(f"the build recipe {recipe} finished but did not produce {path}; "
                                f"its output_dir must be the parent of {path}")


def cli(argv: Sequence[str] | None = None) -> int:
    """``python distill/train.py``: exit 0 done, 1 a failed gate or a diverged run, 2 bad input (distill/cli.py)."""
    return run_cli(lambda: main(argv), debug_requested(argv),
                   failed=(ParityGateError, NonFiniteLossError, NonFiniteWeightsError, NonFiniteError))


if __name__ == "__main__":
    sys.exit(cli())
