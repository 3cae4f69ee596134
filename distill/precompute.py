"""Write the teacher's targets for a sharded corpus as sidecar shards (see distill/shards.py).

    python -m distill.precompute --config configs/my_recipe.yaml
    python -m distill.precompute teacher.name_or_path=DIR data.train='corpus/{00000..00123}.tar' \\
        data.targets=targets/ cache.views=4
    torchrun --nproc_per_node 8 -m distill.precompute ...                  # or accelerate launch -m
    accelerate launch --num_machines 4 --machine_rank R --main_process_ip HOST -m distill.precompute ...

It reads the recipe the trainer reads (``teacher``, ``data.train``, ``data.targets``,
``cache.views``, ``seed``, ``optim.batch_size`` as the teacher's batch) and writes, for every
corpus shard, a sidecar of the same file name in ``data.targets``: for each sample key the
teacher's embeddings of K augmented views (view 0 the plain image, then seeded crops and flips,
whose boxes are stored with them) and of each of its captions. Shards are dealt round-robin to
the processes of all machines; each sidecar is written under a temporary name, fsynced, renamed,
and only then given its manifest (sha256, samples, and the sha256 and size of the corpus shard
as it was read), so a killed run resumes shard by shard: finished shards (manifest present,
checksum matching, corpus shard unchanged) are skipped, others are redone whole. Checking that a
corpus shard is unchanged reads it once (a ``pipe:`` shard is streamed for it).
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path
from typing import Iterator, Sequence

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from accelerate import PartialState

from clipcore.augment import ViewSpec
from clipcore.dual_encoder import DualEncoder
from clipcore.imaging import ImageDecodeError, decode_image
from clipcore.loading import load_teacher
from distill import shards
from distill.cli import debug_requested, run_cli
from distill.config import ConfigError, TrainConfig, load_config

log = logging.getLogger("distill.precompute")


def sidecar_meta(cfg: TrainConfig, teacher: DualEncoder) -> dict:
    return {"format": shards.SIDECAR_FORMAT, "teacher": teacher.fingerprint(),
            "preprocess": teacher.image_transform.to_json(), "views": cfg.cache.views, "seed": cfg.seed,
            "embed_dim": teacher.embed_dim}


def _samples(url: str, views: ViewSpec, digest=None) -> Iterator[dict]:
    """Decoded samples with their K views (PIL images), view parameters and content hash."""
    for sample in shards.read_samples(url, digest):
        key = sample["__key__"]
        try:
            image = decode_image(shards.image_bytes(sample, url), source=f"{url} {key}")
        except ImageDecodeError as exc:
            log.warning("skipping %s", exc)  # no sidecar entry; the trainer skips it too
            continue
        params = []
        for k in range(views.views):
            box, flip = views.box(key, k, *image.size)
            params.append({"box": list(box), "flip": bool(flip)})
        yield {"key": key, "views": params, "images": [shards.apply_view(image, v) for v in params],
               "captions": shards.captions_of(sample, url), "source": shards.sample_digest(sample, url)}


@torch.no_grad()
def embed_shard(teacher: DualEncoder, url: str, views: ViewSpec, batch_size: int, device) -> tuple[list[dict], dict]:
    """Sidecar records of one shard, in its order, and ``{"sha256", "bytes"}`` of the shard as it was
    read; batches never cross shards (so any process count gives the same bytes)."""
    records, pending = [], []
    digest = shards.ContentHash()

    def flush():
        pixels = torch.stack([torch.from_numpy(teacher.image_transform(im)) for s in pending for im in s["images"]])
        emb = teacher.encode_image(pixels.to(device)).float().cpu().view(len(pending), views.views, -1)
        texts = [c for s in pending for c in s["captions"]]
        text_emb = teacher.encode_text(texts).float().cpu() if texts else None
        start = 0
        for s, e in zip(pending, emb):
            caps = None
            if s["captions"]:
                caps = text_emb[start:start + len(s["captions"])].numpy()
                start += len(s["captions"])
            records.append({"key": s["key"], "teacher": e.numpy(), "views": s["views"], "captions": caps,
                            "source": s["source"]})
        pending.clear()

    for sample in _samples(url, views, digest):  # read, and hashed, to the shard's last byte
        pending.append(sample)
        if len(pending) * views.views >= batch_size:
            flush()
    if pending:
        flush()
    return records, digest.source()


def precompute(cfg: TrainConfig) -> dict:
    """Write the missing sidecars of this process's shards. Returns counts for this process."""
    if not shards.is_shard_spec(cfg.data.train):
        raise ConfigError(f"data.train={cfg.data.train!r} is not a WebDataset shard spec (path/{{00000..00099}}.tar)")
    if not cfg.data.targets:
        raise ConfigError("data.targets is empty: set the directory the sidecar shards go to")
    state = PartialState(cpu=cfg.cpu)
    targets = Path(cfg.data.targets)
    urls = shards.expand_urls(cfg.data.train)
    shards.check_shards(urls, None)  # a truncated shard is refused now, not after the shards before it
    torch.manual_seed(cfg.seed + 1)  # as the trainer seeds a random-init teacher
    teacher = load_teacher(cfg.teacher.name_or_path, random_init=cfg.teacher.random_init, device=state.device)
    if state.is_main_process:
        shards.write_or_check_meta(targets, sidecar_meta(cfg, teacher))
    state.wait_for_everyone()
    shards.write_or_check_meta(targets, sidecar_meta(cfg, teacher))  # every process checks it agrees
    views = ViewSpec(views=cfg.cache.views, seed=cfg.seed)
    mine = shards.assigned(urls, state.process_index, state.num_processes)
    for url in mine:  # what a killed run was writing: never read, redone below
        for stale in targets.glob(f".{shards.shard_name(url)}.*.tmp"):
            stale.unlink(missing_ok=True)
    todo = []
    for url in mine:
        problem = shards.sidecar_problem(targets, shards.shard_name(url), url)
        if problem is not None:
            todo.append(url)
            if problem != "not written":
                log.info("process %d: redoing the sidecar of %s: %s", state.process_index, url, problem)
    log.info("process %d/%d: %d shards, %d finished earlier (skipped), %d to write",
             state.process_index, state.num_processes, len(mine), len(mine) - len(todo), len(todo))
    samples = 0
    for i, url in enumerate(todo):
        t0 = time.perf_counter()
        records, source = embed_shard(teacher, url, views, cfg.optim.batch_size, state.device)
        manifest = shards.write_sidecar(targets, shards.shard_name(url), records, source)
        samples += manifest["samples"]
        log.info("process %d: %s: %d samples in %.1f s (%d/%d)", state.process_index, manifest["shard"],
                 manifest["samples"], time.perf_counter() - t0, i + 1, len(todo))
    state.wait_for_everyone()
    if state.is_main_process:
        missing = [u for u in urls if not shards.sidecar_done(targets, shards.shard_name(u))]
        if missing:
            raise RuntimeError(f"{len(missing)} sidecars are missing after the run, e.g. for {missing[0]}")
        log.info("all %d sidecars are in %s", len(urls), targets)
    return {"shards": len(mine), "skipped": len(mine) - len(todo), "written": len(todo), "samples": samples}


def main(argv: Sequence[str] | None = None) -> dict:
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("distill").setLevel(logging.INFO)
    p = argparse.ArgumentParser(prog="python -m distill.precompute", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=None, help="a training recipe (YAML); key=value overrides follow")
    p.add_argument("--debug", action="store_true", help="print the traceback of an error (also: CLIP_DISTILL_DEBUG=1)")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args(argv)
    return precompute(load_config(args.config, args.overrides))


def cli(argv: Sequence[str] | None = None) -> int:
    """``python -m distill.precompute``: exit 0 done, 2 bad input, 1 otherwise (distill/cli.py)."""
    return run_cli(lambda: main(argv), debug_requested(argv))


if __name__ == "__main__":
    sys.exit(cli())
