"""WebDataset tar shards: naming, splitting over processes and workers, reading, teacher-target sidecars.

A corpus is a list of tar shards, ``data.train=path/{00000..00123}.tar`` (brace-expanded; ``::``
joins several lists), local files or ``pipe:`` commands (``pipe:curl -s https://host/{00000..00009}.tar``,
``pipe:aws s3 cp s3://bucket/00003.tar -``). Samples are grouped by key, as WebDataset writes them
(``KEY.jpg``, ``KEY.cls``, ``KEY.txt`` or ``KEY.json`` with ``{"captions": [...]}``).

Sidecar shards (``data.targets=DIR``, written by ``python -m distill.precompute``) hold the
teacher's targets keyed by the same sample keys, one sidecar per corpus shard with the same file
name: ``DIR/00003.tar`` holds ``KEY.teacher.npy`` (K views x D, float16), ``KEY.views.json`` (each
view's crop box and flip in the image's pixels), ``KEY.captions.npy`` (C captions x D, float16) and
``KEY.source.sha256`` (the hash of the image bytes and captions the targets were computed from),
in the order of the corpus shard, and ``DIR/00003.json``, the manifest with its sha256 and the
``source`` shard's sha256 and size, written last: a sidecar without a matching manifest is
unfinished, and one whose shard changed since is stale (precompute redoes it, training refuses it). ``DIR/meta.json`` records the teacher,
its preprocessing, the views and the seed the sidecars were made with.

Each shard is read by exactly one DataLoader worker of one process: shard ``i`` goes to global
worker ``i mod (processes x workers)``, where process ``r``'s worker ``w`` is global worker
``r x workers + w``.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import re
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "ppm", "bmp", "tif", "tiff")
META = "meta.json"
SIDECAR_FORMAT = "clip-distill-targets-v1"


class ShardError(ValueError):
    """A shard spec, shard or sidecar is malformed or inconsistent; the message names it."""


def is_shard_spec(path: object) -> bool:
    """True for a WebDataset shard spec: ``pipe:...`` or a name ending in ``.tar`` (braces allowed).

    False for anything but a string (``data.train`` as a list of mixture sources).
    """
    return isinstance(path, str) and bool(path) and (path.startswith("pipe:") or bool(re.search(r"\.tar\}?$", path.split("::")[-1].strip())))


def expand_urls(spec: str) -> list[str]:
    """``a/{000..003}.tar::b/x.tar`` -> the shard URLs, in order."""
    from braceexpand import braceexpand

    urls = [u for part in spec.split("::") for u in braceexpand(part.strip()) if u]
    if not urls:
        raise ShardError(f"data.train={spec!r} names no shards")
    for url in urls:
        if not url.startswith("pipe:") and not Path(url).expanduser().is_file():
            raise ShardError(f"shard {url} (from data.train={spec!r}) does not exist")
    names = [shard_name(u) for u in urls]
    if len(set(names)) != len(names):
        raise ShardError(f"data.train={spec!r}: shard file names repeat; sidecars are named after them")
    return urls


def shard_name(url: str) -> str:
    """The shard's file name (``00003.tar``), which names its sidecar; also inside ``pipe:`` commands."""
    found = re.findall(r"[^/\s'\"]+\.tar\b", url)
    if not found:
        raise ShardError(f"cannot tell the .tar file name of shard {url!r}")
    return found[-1]


def assigned(urls: Sequence[str], rank: int, world: int, worker: int = 0, workers: int = 1) -> list[str]:
    """The shards global worker ``rank x workers + worker`` reads (round-robin)."""
    me, total = rank * workers + worker, world * workers
    return [u for i, u in enumerate(urls) if i % total == me]


def read_samples(url: str, digest=None) -> Iterator[dict[str, Any]]:
    """Raw samples of one shard: ``{"__key__": ..., "jpg": bytes, ...}`` (local file or ``pipe:``).

    Args:
        digest: a :class:`ContentHash` fed every byte of the shard as it is read (to its very end),
            so that what was read is hashed, not the file as it may be later.
    """
    from webdataset.tariterators import group_by_keys, tar_file_expander, tarfile_samples, url_opener

    if digest is None:
        yield from tarfile_samples([{"url": url}])
        return
    stream = next(url_opener([{"url": url}]))["stream"]
    reader = _HashingReader(stream, digest)
    try:
        yield from group_by_keys(tar_file_expander([{"url": url, "stream": reader}]))
        while reader.read(1 << 20):  # the padding after the end-of-archive marker
            pass
    finally:
        stream.close()


class ContentHash:
    """sha256 and byte count of a shard's content, fed as it is read."""

    def __init__(self):
        self.sha256, self.bytes = hashlib.sha256(), 0

    def update(self, data: bytes) -> None:
        self.sha256.update(data)
        self.bytes += len(data)

    def source(self) -> dict:
        """What a sidecar manifest records of the shard it was computed from."""
        return {"sha256": self.sha256.hexdigest(), "bytes": self.bytes}


class _HashingReader:
    """A read-only stream that feeds what is read through it to a :class:`ContentHash`."""

    def __init__(self, stream, digest):
        self.stream, self.digest = stream, digest

    def read(self, size: int = -1) -> bytes:
        data = self.stream.read(size)
        self.digest.update(data)
        return data


def shard_sha256(url: str) -> dict:
    """``{"sha256", "bytes"}`` of a corpus shard's content (a ``pipe:`` shard is read to hash it)."""
    if not url.startswith("pipe:"):
        path = Path(url).expanduser()
        return {"sha256": file_sha256(path), "bytes": path.stat().st_size}
    from webdataset.tariterators import url_opener

    stream = next(url_opener([{"url": url}]))["stream"]
    digest = ContentHash()
    try:
        while data := stream.read(1 << 20):
            digest.update(data)
    finally:
        stream.close()
    return digest.source()


def sample_digest(sample: dict, url: str) -> str:
    """sha256 of what a sample's teacher targets are computed from: its image bytes and captions."""
    h = hashlib.sha256(image_bytes(sample, url))
    h.update(json.dumps(captions_of(sample, url), ensure_ascii=False).encode())
    return h.hexdigest()


def image_bytes(sample: dict, url: str) -> bytes:
    for ext in IMAGE_EXTENSIONS:
        if ext in sample:
            return sample[ext]
    raise ShardError(f"{url}: sample {sample['__key__']} has no image (one of {', '.join(IMAGE_EXTENSIONS)}); "
                     f"it has {sorted(k for k in sample if not k.startswith('__'))}")


def captions_of(sample: dict, url: str) -> list[str]:
    """``KEY.txt`` (one caption) or ``KEY.json`` with ``captions`` (a list) or ``caption``; blanks dropped."""
    if "txt" in sample:
        caps = [sample["txt"].decode("utf-8")]
    elif "json" in sample:
        try:
            meta = json.loads(sample["json"])
        except ValueError as exc:
            raise ShardError(f"{url}: {sample['__key__']}.json is not JSON ({exc})") from exc
        value = meta.get("captions", meta.get("caption")) if isinstance(meta, dict) else None
        caps = [] if value is None else [value] if isinstance(value, str) else list(value)
    else:
        caps = []
    return [c for c in caps if isinstance(c, str) and c.strip()]


def label_of(sample: dict) -> int | None:
    return int(sample["cls"].decode().strip()) if "cls" in sample else None


# ---------------------------------------------------------------------------------- sidecars


def file_sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def manifest_path(targets: Path, name: str) -> Path:
    return targets / (name[: -len(".tar")] + ".json")


def sidecar_done(targets: Path, name: str, url: str | None = None) -> bool:
    """A sidecar counts as written when its manifest exists and its checksum matches and, given the
    corpus shard's ``url``, when the shard's content is still the one the sidecar was computed from."""
    return sidecar_problem(targets, name, url) is None


def sidecar_problem(targets: Path, name: str, url: str | None = None) -> str | None:
    """Why sidecar ``name`` must be (re)written, or None when it is finished (see :func:`sidecar_done`)."""
    manifest, tar = manifest_path(targets, name), targets / name
    if not manifest.is_file() or not tar.is_file():
        return "not written"
    try:
        recorded = read_manifest(targets, name)
    except ShardError:  # a garbage manifest: the sidecar is rewritten
        return f"{manifest.name} is not a sidecar manifest"
    if recorded["sha256"] != file_sha256(tar):
        return f"{tar.name} does not match the checksum in {manifest.name}"
    if url is None:
        return None
    source = recorded.get("source")
    if not isinstance(source, dict):
        return "written before sidecars recorded the content hash of their shard"
    local = None if url.startswith("pipe:") else Path(url).expanduser()
    if local is not None and local.stat().st_size != source.get("bytes"):
        return f"shard {url} changed since (its size differs)"
    if shard_sha256(url)["sha256"] != source.get("sha256"):
        return f"shard {url} changed since (its sha256 differs)"
    return None


def check_sources(urls: Sequence[str], targets: Path) -> None:
    """Before a stream starts: every sidecar records the content hash of the shard it was computed
    from, and a local shard still has that size. (Each sample is then checked against its own
    recorded hash as it is read, see :func:`sample_digest`.)

    Raises:
        ShardError: naming the shard and its sidecar.
    """
    for url in urls:
        name = shard_name(url)
        source = read_manifest(targets, name).get("source")
        sidecar = Path(targets) / name
        if not isinstance(source, dict):
            raise ShardError(f"{sidecar}: written before sidecars recorded the content hash of their shard, so it "
                             f"cannot be checked against {url}; re-run `python -m distill.precompute`")
        if not url.startswith("pipe:") and Path(url).expanduser().stat().st_size != source.get("bytes"):
            raise ShardError(f"shard {url} changed after its targets {sidecar} were computed ({source.get('bytes')} "
                             "bytes then); re-run `python -m distill.precompute` (it redoes changed shards)")


def read_manifest(targets: Path, name: str) -> dict:
    """The manifest of sidecar ``name``: a JSON object with its ``sha256`` and ``bytes``.

    Raises:
        ShardError: missing, unreadable, not JSON or without those fields (naming the file).
    """
    path = manifest_path(Path(targets), name)
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise ShardError(f"{path}: missing, so the sidecar of shard {name} is unfinished; run "
                         "`python -m distill.precompute` (it resumes where it stopped)") from None
    except (OSError, ValueError) as exc:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise ShardError(f"{path}: not a sidecar manifest ({type(exc).__name__}: {exc}); delete it and its "
                         "sidecar and re-run precompute") from exc
    if not (isinstance(manifest, dict) and isinstance(manifest.get("sha256"), str)
            and isinstance(manifest.get("bytes"), int)):
        raise ShardError(f"{path}: not a sidecar manifest (expected a JSON object with sha256 and bytes); "
                         "delete it and its sidecar and re-run precompute")
    return manifest


def check_tar(path: Path, what: str) -> int:
    """Walk ``path``'s member headers to its end-of-archive marker; returns the member count.

    Only the 512-byte headers are read (member data is seeked over), so the walk costs a small
    fraction of reading the shard: a truncated tar is refused here, not after hours of training.

    Raises:
        ShardError: unreadable, truncated (mid-member, or at a member boundary: no end marker).
    """
    import tarfile

    try:
        with open(path, "rb") as f, tarfile.open(fileobj=f, mode="r:") as tar:
            members = sum(1 for _ in tar)
            f.seek(tar.offset)
            end = f.read(1024)
    except (OSError, tarfile.TarError) as exc:
        raise ShardError(f"{what} {path}: not a readable tar ({type(exc).__name__}: {exc}; truncated?)") from exc
    if end != bytes(1024):  # tar writers close an archive with two zero blocks
        raise ShardError(f"{what} {path}: ends after {members} members without the end-of-archive marker "
                         "(truncated?)")
    return members


def check_shards(urls: Sequence[str], targets: Path | None) -> None:
    """Before a stream starts: every local corpus shard is a complete tar and, with ``targets``,
    every shard has its sidecar, with a manifest that parses and a size that matches it, itself a
    complete tar (its checksum is verified when it is read). ``pipe:`` shards cannot be checked
    without reading them; their sidecars are.

    Raises:
        ShardError: naming the first file that fails.
    """
    for url in urls:
        if not url.startswith("pipe:"):
            check_tar(Path(url).expanduser(), "shard")
        if targets is None:
            continue
        name = shard_name(url)
        tar, manifest = Path(targets) / name, read_manifest(targets, name)
        if not tar.is_file():
            raise ShardError(f"{tar}: the sidecar of shard {url} is missing; run `python -m distill.precompute`")
        if tar.stat().st_size != manifest["bytes"]:
            raise ShardError(f"{tar}: {tar.stat().st_size} bytes, its manifest {manifest_path(Path(targets), name).name} "
                             f"records {manifest['bytes']} (truncated?); delete both and re-run precompute")
        check_tar(tar, "sidecar")


def encode_npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def decode_npy(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


def write_sidecar(targets: Path, name: str, records: Iterable[dict], source: dict | None = None) -> dict:
    """Write one sidecar atomically (temporary name, fsync, rename), then its manifest (last).

    ``records``: ``{"key", "teacher": (K, D), "views": [...], "captions": (C, D) or None, "source":
    sample_digest}``; ``source``: ``{"sha256", "bytes"}`` of the corpus shard they were computed from.
    """
    from webdataset import TarWriter

    tmp = targets / f".{name}.{os.getpid()}.tmp"
    count = 0
    with open(tmp, "wb") as f:
        writer = TarWriter(f, encoder=False, mtime=0)  # mtime 0: the same targets give the same bytes
        for rec in records:
            sample = {"__key__": rec["key"], "teacher.npy": encode_npy(np.asarray(rec["teacher"], np.float16)),
                      "views.json": json.dumps(rec["views"]).encode()}
            if rec.get("captions") is not None:
                sample["captions.npy"] = encode_npy(np.asarray(rec["captions"], np.float16))
            if rec.get("source") is not None:
                sample["source.sha256"] = rec["source"].encode()
            writer.write(sample)
            count += 1
        writer.close()
        f.flush()
        os.fsync(f.fileno())
    manifest = {"shard": name, "samples": count, "sha256": file_sha256(tmp), "bytes": tmp.stat().st_size}
    if source is not None:
        manifest["source"] = dict(source)
    os.replace(tmp, targets / name)
    _atomic_text(manifest_path(targets, name), json.dumps(manifest, indent=1))
    return manifest


def _atomic_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def read_meta(targets: Path) -> dict:
    path = Path(targets) / META
    if not path.is_file():
        raise ShardError(f"data.targets={targets}: no {META}; write the targets with `python -m distill.precompute`")
    return _json_object(path)


def _json_object(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ShardError(f"{path}: unreadable ({type(exc).__name__}: {exc})") from exc
    if not isinstance(data, dict):
        raise ShardError(f"{path}: expected a JSON object, got a {type(data).__name__}")
    return data


def write_or_check_meta(targets: Path, meta: dict) -> None:
    """Create ``meta.json``, or check that an existing one (a resumed precompute) matches."""
    path = targets / META
    if path.is_file():
        old = _json_object(path)
        diff = sorted(k for k in set(old) | set(meta) if old.get(k) != meta.get(k))
        if diff:
            raise ShardError(f"{path} was written with other settings ({', '.join(diff)} differ); "
                             "use a new targets directory or the original settings")
        return
    targets.mkdir(parents=True, exist_ok=True)
    _atomic_text(path, json.dumps(meta, indent=1, sort_keys=True))


def read_sidecar(targets: Path, name: str) -> Iterator[dict]:
    """Records of one finished sidecar, checksum verified first."""
    tar = Path(targets) / name
    manifest = manifest_path(Path(targets), name)
    if not manifest.is_file() or not tar.is_file():
        raise ShardError(f"{tar}: no finished sidecar for shard {name}; run `python -m distill.precompute` "
                         "(it resumes where it stopped)")
    want = read_manifest(Path(targets), name)["sha256"]
    if file_sha256(tar) != want:
        raise ShardError(f"{tar}: checksum does not match {manifest.name}; delete both and re-run precompute")
    for sample in read_samples(str(tar)):
        yield {"key": sample["__key__"], "teacher": decode_npy(sample["teacher.npy"]),
               "views": json.loads(sample["views.json"]),
               "captions": decode_npy(sample["captions.npy"]) if "captions.npy" in sample else None,
               "source": sample["source.sha256"].decode() if "source.sha256" in sample else None}


def apply_view(image, view: dict):
    """A stored view (``{"box": [l, t, r, b], "flip": bool}``) applied to a decoded PIL image."""
    from PIL import Image

    box = tuple(view["box"])
    out = image.crop(box) if box != (0, 0, *image.size) else image
    return out.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if view["flip"] else out


def shuffled(items: Iterable, buffer: int, rng: random.Random) -> Iterator:
    """A shuffle buffer of ``buffer`` items (0 or 1: the input order)."""
    if buffer <= 1:
        yield from items
        return
    pool: list = []
    for item in items:
        pool.append(item)
        if len(pool) >= buffer:
            yield pool.pop(rng.randrange(len(pool)))
    rng.shuffle(pool)
    yield from pool
