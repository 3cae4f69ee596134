"""WebDataset shards and `datasets` streaming: splitting, precomputed sidecar targets (1 vs 2
processes, resume after SIGKILL), and a run on shards against the same rows as parquet."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import datasets
import pytest
import torch

from distill import shards
from clipcore.testing import free_port, make_tiny_clip
from distill.train import main
from tests.conftest import SHARED_DATA
from tests.datagen import png

REPO = Path(__file__).resolve().parents[1]
GENERATED_NAMES = ["cat", "dog", "car"]


def source_rows(n: int) -> tuple[list[dict], list[str]]:
    """The first ``n`` CIFAR-10 training images from ../shared/data, or generated ones where it is absent."""
    cifar = SHARED_DATA / "cifar10"
    files = sorted(cifar.glob("**/train-*.parquet")) if cifar.exists() else []
    if files:
        import pyarrow.parquet as pq

        table = pq.read_table(files[0]).slice(0, n).to_pylist()
        names = datasets.load_dataset("parquet", data_files=str(files[0]), split="train[:1]").features["label"].names
        return [{"image": r["img"]["bytes"], "label": r["label"]} for r in table], names
    return [{"image": png(i, size=(32, 32), tint=i % 3), "label": i % 3} for i in range(n)], GENERATED_NAMES


def write_shards(rows, directory: Path, per_shard: int, order=None, captions=False) -> str:
    from webdataset import TarWriter

    directory.mkdir(parents=True, exist_ok=True)
    order = list(range(len(rows))) if order is None else list(order)
    for s in range(0, len(order), per_shard):
        with TarWriter(str(directory / f"shard-{s // per_shard:05d}.tar"), encoder=False) as w:
            for i in order[s:s + per_shard]:
                sample = {"__key__": f"r{i:06d}", "jpg": rows[i]["image"], "cls": str(rows[i]["label"]).encode()}
                if captions:
                    sample["json"] = json.dumps({"captions": [f"photo {i}", f"image of {i % 3}"][: 1 + i % 2]}).encode()
                w.write(sample)
    return str(directory / f"shard-{{00000..{(len(order) - 1) // per_shard:05d}}}.tar")


def write_parquet(rows, names, directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    feats = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=names)})
    table = {"image": [{"bytes": r["image"], "path": None} for r in rows], "label": [r["label"] for r in rows]}
    for split in ("train", "test"):
        datasets.Dataset.from_dict(table, features=feats).to_parquet(str(directory / f"{split}-00000-of-00001.parquet"))
    return directory


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("shards")
    rows, names = source_rows(48)
    teacher = make_tiny_clip(root / "teacher", seed=1)
    spec = write_shards(rows, root / "corpus", per_shard=8, captions=True)  # 6 shards
    return root, rows, names, teacher, spec


def _precompute_args(corpus, targets, *extra):
    root, _, _, teacher, spec = corpus
    return [f"teacher.name_or_path={teacher}", f"data.train={spec}", f"data.targets={targets}", "cache.views=2",
            "optim.batch_size=8", "cpu=true", *extra]


def _sidecars(targets: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(targets.glob("*.tar"))}


@pytest.fixture(scope="module")
def one_process_targets(corpus):
    from accelerate.state import AcceleratorState, PartialState

    from distill.precompute import main as precompute

    targets = corpus[0] / "targets-1"
    # one thread, as the torchrun workers of the comparisons run (OMP_NUM_THREADS=1): a float16 target
    # can differ in its last bit between thread counts, which "byte for byte" would read as a difference
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        counts = precompute(_precompute_args(corpus, targets))
    finally:
        torch.set_num_threads(threads)
    AcceleratorState._reset_state()
    PartialState._reset_state()
    assert counts == {"shards": 6, "skipped": 0, "written": 6, "samples": 48}
    return targets


def test_shard_specs_names_and_split():
    assert shards.is_shard_spec("data/{00000..00123}.tar") and shards.is_shard_spec("pipe:curl -s http://h/a.tar")
    assert not shards.is_shard_spec("../shared/data/cifar10") and not shards.is_shard_spec("uoft-cs/cifar10")
    assert shards.shard_name("pipe:aws s3 cp s3://b/train/00003.tar -") == "00003.tar"
    urls = [f"{i:05d}.tar" for i in range(13)]
    seen = [u for r in range(2) for w in range(3) for u in shards.assigned(urls, r, 2, w, 3)]
    assert sorted(seen) == urls  # every shard read once, by one worker of one process
    with pytest.raises(shards.ShardError, match="does not exist"):
        shards.expand_urls("/nonexistent/{0..3}.tar")


def test_stream_reads_each_shard_in_one_worker_of_one_process(corpus):
    from clipcore.augment import ViewSpec
    from distill.stream_data import ShardStream
    from clipcore.loading import load_teacher

    root, rows, _, teacher_dir, spec = corpus
    transform = load_teacher(str(teacher_dir)).image_transform
    urls = shards.expand_urls(spec)[:4]  # 4 shards of 8: 2 processes x 2 workers, one shard each
    keys = []
    for rank in range(2):
        stream = ShardStream(urls, None, ViewSpec(), {"student": transform}, 0, 0, rank, 2)
        loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=2)
        it = iter(loader)
        keys += [next(it)["key"] for _ in range(16)]
    assert sorted(keys) == sorted(f"r{i:06d}" for i in range(32))


def test_fewer_shards_than_readers_is_an_error_naming_the_counts(corpus):
    from clipcore.augment import ViewSpec
    from distill.stream_data import ShardStream
    from clipcore.loading import load_teacher

    root, rows, _, teacher_dir, spec = corpus
    transform = load_teacher(str(teacher_dir)).image_transform
    stream = ShardStream(shards.expand_urls(spec)[:1], None, ViewSpec(), {"student": transform}, 0, 0, 1, 2)
    with pytest.raises(shards.ShardError, match=r"1 shards for 2 processes x 1 DataLoader workers: each shard is read "
                                                r"by one worker of one process"):
        next(iter(stream))


def test_precompute_two_processes_equal_one(corpus, one_process_targets, tmp_path):
    targets = tmp_path / "targets-2"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           "-m", "distill.precompute", *_precompute_args(corpus, targets)]
    proc = subprocess.run(cmd, cwd=REPO, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "process 1/2: 3 shards" in proc.stderr
    one, two = _sidecars(one_process_targets), _sidecars(targets)
    assert len(one) == 6 and one == two  # byte for byte
    rec = next(shards.read_sidecar(targets, "shard-00000.tar"))
    assert rec["teacher"].shape == (2, 16) and len(rec["views"]) == 2 and rec["captions"].shape[0] in (1, 2)


def test_killed_precompute_resumes_without_redoing_finished_shards(corpus, one_process_targets, tmp_path):
    root, _, _, _, spec = corpus
    # pipe: URLs that take a while each, so the kill lands between shards
    urls = shards.expand_urls(spec)
    slow = "::".join(f"pipe:sleep 0.4; cat {u}" for u in urls)
    targets = tmp_path / "targets"
    cmd = [sys.executable, "-m", "distill.precompute", *_precompute_args(corpus, targets, f"data.train={slow}")]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    victim = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while not list(targets.glob("shard-*.json")) and victim.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    running = victim.poll() is None
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    done = {p.name: p.stat().st_mtime_ns for p in targets.glob("shard-*.json")}
    assert running and 1 <= len(done) < 6, done
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"{len(done)} finished earlier (skipped), {6 - len(done)} to write" in proc.stderr
    assert {n: (targets / n).stat().st_mtime_ns for n in done} == done  # not rewritten
    assert _sidecars(targets) == _sidecars(one_process_targets)
    assert not list(targets.glob(".*.tmp"))  # the killed run's half-written sidecar is gone


def test_corrupt_sidecar_is_refused_and_rewritten(corpus, one_process_targets, tmp_path):
    import shutil

    targets = tmp_path / "t"
    shutil.copytree(one_process_targets, targets)
    tar = targets / "shard-00002.tar"
    tar.write_bytes(tar.read_bytes()[:-10] + b"0123456789")
    with pytest.raises(shards.ShardError, match="checksum"):
        next(shards.read_sidecar(targets, "shard-00002.tar"))
    assert not shards.sidecar_done(targets, "shard-00002.tar") and shards.sidecar_done(targets, "shard-00001.tar")


def _train_args(root, teacher, out, *extra):
    recipe = root / "empty.yaml"
    recipe.write_text("{}\n")
    return ["--config", str(recipe), f"teacher.name_or_path={teacher}", "student.arch=test-tiny-resnet",
            "optim.batch_size=8", "optim.warmup_steps=1", "log_every=1", "progress=false", "data.eval_limit=8",
            f"output_dir={out}", f"cache.dir={root / 'cache'}", "data.student_flip=true", "data.student_shift=2",
            *extra]


def _log(out):
    return [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]


def test_shards_with_targets_train_like_the_same_rows_as_parquet(tmp_path):
    from distill.precompute import main as precompute

    rows, names = source_rows(64)
    teacher = make_tiny_clip(tmp_path / "teacher", seed=1)
    parquet = write_parquet(rows, names, tmp_path / "parquet")
    # the shards hold the rows in the order the parquet run's first epoch visits them
    order = torch.randperm(64, generator=torch.Generator().manual_seed(0)).tolist()
    spec = write_shards(rows, tmp_path / "corpus", per_shard=16, order=order)
    targets = tmp_path / "targets"
    precompute([f"teacher.name_or_path={teacher}", f"data.train={spec}", f"data.targets={targets}",
                "optim.batch_size=8", "cpu=true"])
    from accelerate.state import AcceleratorState, PartialState

    AcceleratorState._reset_state()
    PartialState._reset_state()
    steps = "optim.max_steps=8"  # one epoch of 64 rows
    main(_train_args(tmp_path, teacher, tmp_path / "parquet-run", steps, f"data.train={parquet}"))
    main(_train_args(tmp_path, teacher, tmp_path / "shard-run", steps, f"data.train={spec}",
                     f"data.targets={targets}", "data.shuffle_buffer=0", f"data.eval={parquet}",
                     f"data.classnames={','.join(names)}"))
    a, b = _log(tmp_path / "parquet-run"), _log(tmp_path / "shard-run")
    assert len(a) == len(b) == 8
    # same batches, pixels and jitter; the teacher's targets were computed in other batches (GEMM
    # blocking) and stored as float16, so they differ by float16 rounding: the curves agree to 1e-3
    for key in ("loss", "kl_class_loss", "feature_image_loss"):
        assert torch.allclose(torch.tensor([r[key] for r in a]), torch.tensor([r[key] for r in b]), rtol=1e-3), key
    cache = next((tmp_path / "cache").glob("*/images-r0.npy"))
    cached = torch.from_numpy(__import__("numpy").load(cache).astype("float32"))
    side = {r["key"]: r["teacher"] for n in range(4) for r in shards.read_sidecar(targets, f"shard-{n:05d}.tar")}
    stored = torch.stack([torch.from_numpy(side[f"r{i:06d}"][0].astype("float32")) for i in range(64)])
    assert torch.allclose(stored, cached[:, 0], atol=2e-3)


def test_caption_shards_train_with_and_without_targets(corpus, one_process_targets, tmp_path):
    root, _, names, teacher, spec = corpus
    common = ("optim.max_steps=3", "student.arch=test-tiny", "loss.clip_weight=1.0", "data.num_workers=2",
              "data.shuffle_buffer=16", f"data.eval={write_parquet(source_rows(8)[0], names, tmp_path / 'ev')}",
              f"data.classnames={','.join(names)}")
    main(_train_args(root, teacher, tmp_path / "targets", f"data.train={spec}",
                     f"data.targets={one_process_targets}", "cache.views=2", *common))
    main(_train_args(root, teacher, tmp_path / "online", f"data.train={spec}", *common))
    for run in ("targets", "online"):
        log = _log(tmp_path / run)
        assert len(log) == 3 and all("clip_loss" in r and "feature_text_loss" in r for r in log), run


def test_datasets_streaming(tmp_path):
    from distill.config import ConfigError

    rows, names = source_rows(32)
    teacher = make_tiny_clip(tmp_path / "teacher", seed=1)
    parquet = write_parquet(rows, names, tmp_path / "parquet")
    args = _train_args(tmp_path, teacher, tmp_path / "out", f"data.train={parquet}", "data.streaming=true",
                       "optim.max_steps=3", f"data.eval={parquet}", "data.shuffle_buffer=8")
    with pytest.raises(ConfigError, match="cache.enabled=false"):
        main(args)
    with pytest.raises(ConfigError, match="data.train_limit=16"):
        main(args + ["cache.enabled=false", "data.train_limit=16"])
    main(args + ["cache.enabled=false"])
    assert len(_log(tmp_path / "out")) == 3


@pytest.mark.parametrize("case, message", [
    ("no-eval", r"is streamed; set data.eval to a map-style dataset"),
    ("streaming-shards", r"data.streaming=true is for `datasets` sources; WebDataset shards stream anyway"),
    ("views-without-targets", r"cache.views > 1 on shards needs precomputed targets \(data.targets\)"),
    ("targets-on-parquet", r"data.targets=.* holds sidecars of WebDataset shards; data.train=.* is not a shard spec"),
])
def test_streamed_data_settings_are_checked(corpus, tmp_path, case, message):
    from distill.config import ConfigError

    root, rows, names, teacher, spec = corpus
    parquet = write_parquet(rows[:8], names, tmp_path / "ev")
    train = {"no-eval": [f"data.train={spec}", "data.eval="],
             "streaming-shards": [f"data.train={spec}", "data.streaming=true"],
             "views-without-targets": [f"data.train={spec}", "cache.views=2"],
             "targets-on-parquet": [f"data.train={parquet}", f"data.targets={tmp_path}"]}[case]
    args = _train_args(root, teacher, tmp_path / "out", "optim.max_steps=1", f"data.eval={parquet}",
                       f"data.classnames={','.join(names)}", *train)
    with pytest.raises(ConfigError, match=message):
        main(args)
    assert not (tmp_path / "out" / "train_log.jsonl").exists()


def test_the_shuffle_buffer_permutes_every_item_once_and_is_seeded():
    import random

    items = list(range(50))
    a = list(shards.shuffled(iter(items), 8, random.Random(3)))
    assert sorted(a) == items and a != items
    assert a == list(shards.shuffled(iter(items), 8, random.Random(3)))
    # a buffer of 8 can delay an item without bound but never emit one before it has been read
    assert all(a.index(i) >= i - 7 for i in items)
    assert list(shards.shuffled(iter(items), 1, random.Random(3))) == items


def test_targets_from_another_teacher_are_refused(corpus, one_process_targets, tmp_path):
    from distill.config import ConfigError

    root, _, names, _, spec = corpus
    other = make_tiny_clip(tmp_path / "other", seed=5)
    with pytest.raises(ConfigError, match="teacher"):
        main(_train_args(root, other, tmp_path / "x", f"data.train={spec}", f"data.targets={one_process_targets}",
                         "cache.views=2", f"data.eval={root}", "optim.max_steps=1"))


def test_datasets_stream_splits_shards_over_processes_and_workers(tmp_path, tiny_clip):
    from clipcore.data import Columns
    from distill.stream_data import HFStream

    feats = datasets.Features({"image": datasets.Image(), "text": datasets.Value("string")})
    for s in range(4):  # 4 parquet files = 4 stream shards: 2 processes x 2 workers, one each
        rows = {"image": [{"bytes": png(s * 5 + i, size=(8, 8)), "path": None} for i in range(5)],
                "text": [f"row {s * 5 + i}" for i in range(5)]}
        datasets.Dataset.from_dict(rows, features=feats).to_parquet(str(tmp_path / f"train-{s:05d}-of-00004.parquet"))
    ds = datasets.load_dataset("parquet", data_dir=str(tmp_path), split="train", streaming=True)
    ds = ds.cast_column("image", datasets.Image(decode=False))
    assert ds.n_shards == 4
    texts = []
    for rank in range(2):
        stream = HFStream(ds, Columns("image", None, "text"), {"student": tiny_clip.image_transform}, 0, 0, rank, 2)
        it = iter(torch.utils.data.DataLoader(stream, batch_size=None, num_workers=2))
        texts += [next(it)["text"] for _ in range(10)]
    assert sorted(texts) == sorted(f"row {i}" for i in range(20))  # one pass, each row once


def _break(case: str, corpus_dir: Path, targets: Path) -> Path:
    """Damage one file of a copied corpus / sidecar directory; returns the file the error must name."""
    if case == "truncated-shard":
        path = corpus_dir / "shard-00003.tar"
        path.write_bytes(path.read_bytes()[:3000])
    elif case == "shard-cut-at-a-member":  # what a copy that stopped between members leaves: no end marker
        import tarfile

        path = corpus_dir / "shard-00003.tar"
        with tarfile.open(path) as tar:
            end = tar.getmembers()[2].offset
        path.write_bytes(path.read_bytes()[:end])
    elif case == "missing-sidecar":
        path = targets / "shard-00004.tar"
        path.unlink()
    elif case == "missing-manifest":
        path = targets / "shard-00004.json"
        path.unlink()
    elif case == "garbage-manifest":
        path = targets / "shard-00001.json"
        path.write_text("{not json")
    else:  # a truncated sidecar whose manifest still records the full size
        path = targets / "shard-00005.tar"
        path.write_bytes(path.read_bytes()[:4096])
    return path


@pytest.mark.parametrize("case", ["truncated-shard", "shard-cut-at-a-member", "missing-sidecar", "missing-manifest",
                                  "garbage-manifest", "truncated-sidecar"])
def test_shards_and_sidecars_are_checked_before_training(corpus, one_process_targets, tmp_path, capsys, case):
    """Issue 28 item 12: a truncated shard failed mid-stream (exit 1 ReadError), a missing sidecar only
    when the stream reached it (after checkpoints), a garbage manifest named no file."""
    import shutil

    from distill.train import cli

    root, _, names, teacher, spec = corpus
    shutil.copytree(Path(spec).parent, tmp_path / "corpus")
    shutil.copytree(one_process_targets, tmp_path / "targets")
    bad = _break(case, tmp_path / "corpus", tmp_path / "targets")
    copied = str(tmp_path / "corpus" / Path(spec).name)
    evals = write_parquet(source_rows(8)[0], names, tmp_path / "ev")
    out = tmp_path / "out"
    capsys.readouterr()
    assert cli(_train_args(root, teacher, out, f"data.train={copied}", f"data.targets={tmp_path / 'targets'}",
                           "cache.views=2", f"data.eval={evals}", f"data.classnames={','.join(names)}",
                           "data.shuffle_buffer=0", "optim.max_steps=50", "save_every=1")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert [x for x in err if x.startswith("error: ")] == err[-1:] and str(bad) in err[-1], err[-3:]
    assert not (out / "checkpoints").exists()  # refused before the first step


def _rewrite(path: Path, change) -> None:
    """Rewrite a corpus shard with the same keys, in order, after ``change(samples)``."""
    from webdataset import TarWriter

    samples = [{k: v for k, v in s.items() if k == "__key__" or not k.startswith("__")}
               for s in shards.read_samples(str(path))]
    change(samples)
    with TarWriter(str(path), encoder=False) as w:
        for s in samples:
            w.write(s)


def _swap_first_images(samples):
    samples[0]["jpg"], samples[1]["jpg"] = samples[1]["jpg"], samples[0]["jpg"]  # same size, other content


def test_a_rewritten_shard_gets_new_targets_and_stale_ones_are_refused(corpus, one_process_targets, tmp_path, capsys):
    """Issue 28, item 1: a shard rewritten with the same keys and new images was skipped by precompute
    ("finished earlier") and training ran on the old targets, exit 0."""
    import shutil

    from accelerate.state import AcceleratorState, PartialState

    from distill.precompute import main as precompute
    from distill.train import cli

    root, _, names, teacher, spec = corpus
    shutil.copytree(Path(spec).parent, tmp_path / "corpus")
    shutil.copytree(one_process_targets, tmp_path / "targets")
    copied, targets = str(tmp_path / "corpus" / Path(spec).name), tmp_path / "targets"
    shard = tmp_path / "corpus" / "shard-00002.tar"
    size = shard.stat().st_size
    _rewrite(shard, _swap_first_images)
    assert shard.stat().st_size == size  # only the content tells
    key = next(shards.read_samples(str(shard)))["__key__"]
    evals = write_parquet(source_rows(8)[0], names, tmp_path / "ev")
    train = _train_args(root, teacher, tmp_path / "out", f"data.train={copied}", f"data.targets={targets}",
                        "cache.views=2", f"data.eval={evals}", f"data.classnames={','.join(names)}",
                        "data.shuffle_buffer=0", "optim.max_steps=8")
    capsys.readouterr()
    assert cli(train) == 2  # the stale sidecar is refused, naming the shard and the sample
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"shard {shard}: sample {key} is not the one its targets" in err, err
    _rewrite(shard, lambda samples: samples[0].update(jpg=png(99, size=(200, 200))))  # 120 kB more
    capsys.readouterr()
    assert cli(train + ["output_dir=" + str(tmp_path / "out2")]) == 2  # refused before the first step
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"shard {shard} changed after its targets {targets / 'shard-00002.tar'} were computed" in err, err
    assert not (tmp_path / "out2" / "checkpoints").exists()
    AcceleratorState._reset_state()
    PartialState._reset_state()
    before = _sidecars(targets)
    counts = precompute(_precompute_args(corpus, targets, f"data.train={copied}"))
    AcceleratorState._reset_state()
    PartialState._reset_state()
    assert counts == {"shards": 6, "skipped": 5, "written": 1, "samples": 8}
    after = _sidecars(targets)
    assert [n for n in after if after[n] != before[n]] == ["shard-00002.tar"]
    assert shards.sidecar_done(targets, "shard-00002.tar", str(shard))  # and training takes it (checked above)
