"""What a zero-shot bundle holds, and the checks that it is whole: file names, the manifest, the certificate.

Torch-free like :mod:`exports.runtime`, which loads bundles after :func:`verify_bundle` passed:
every file listed in ``manifest.json`` with its size and sha256, no links, ``config.json`` and the
manifest matching their schemas (:mod:`exports.bundle_schema`), and the files the certificate
vouches for being the ones the bundle holds.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Iterable, Mapping

from exports import bundle_schema

BUNDLE_FORMAT = "clip-distill-zeroshot-bundle"
BUNDLE_VERSION = 1
MANIFEST = "manifest.json"
CONFIG = "config.json"
CLASSES = "classes.json"
TEXT_EMBEDDINGS = "text_embeddings.npy"
CERTIFICATE = "certificate.json"
PARITY_REPORT = "parity.json"
REQUIRED_FILES = (CONFIG, CLASSES, TEXT_EMBEDDINGS)  # plus the image encoder named in config.json


class BundleError(ValueError):
    """A bundle directory is missing, incomplete, tampered with or inconsistent; the message names the file."""



# ----------------------------------------------------------------------------- manifest


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def write_manifest(directory: str | Path, files: Iterable[str]) -> Path:
    """Hash ``files`` (relative to ``directory``) into ``directory/manifest.json``."""
    directory = Path(directory)
    entries = {
        name: {"sha256": sha256_file(directory / name), "bytes": (directory / name).stat().st_size}
        for name in sorted(files)
    }
    manifest = {"format": BUNDLE_FORMAT, "version": BUNDLE_VERSION, "files": entries}
    path = directory / MANIFEST
    path.write_text(json.dumps(manifest, indent=2) + "\n")
    return path


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleError(f"{path}: unreadable JSON ({type(exc).__name__}: {exc})") from exc


def verify_bundle(directory: str | Path) -> dict[str, Any]:
    """Check that ``directory`` is a complete, untampered bundle; return its config.

    Raises:
        BundleError: naming the directory or the first file that is missing, unlisted or whose
            sha256 differs from the manifest.
    """
    directory = Path(directory)
    if not directory.is_dir():
        what = "does not exist" if not directory.exists() else "is a file, not a bundle directory"
        raise BundleError(f"{directory}: {what}")
    manifest_path = directory / MANIFEST
    if not manifest_path.is_file():
        raise BundleError(
            f"{directory}: not a zero-shot bundle (no {MANIFEST}); a bundle holds {', '.join(REQUIRED_FILES)}, "
            f"an image encoder .onnx and {MANIFEST}, and is written by exports.bundle.write_bundle"
        )
    _refuse_link(directory, manifest_path)
    manifest = read_json(manifest_path)
    if not isinstance(manifest, dict) or manifest.get("format") != BUNDLE_FORMAT:
        raise BundleError(f"{manifest_path}: not a {BUNDLE_FORMAT} manifest")
    version = manifest.get("version")
    if isinstance(version, int) and not isinstance(version, bool) and version > BUNDLE_VERSION:
        raise BundleError(
            f"{manifest_path}: bundle version {version} is newer than this runtime "
            f"supports ({BUNDLE_VERSION}); upgrade clip-distill"
        )
    _check_schema(manifest_path, manifest, bundle_schema.MANIFEST)
    files = manifest["files"]
    for name, entry in sorted(files.items()):
        path = directory / name
        if not path.is_file() and not path.is_symlink():
            raise BundleError(f"{path}: listed in {MANIFEST} but missing")
        _refuse_link(directory, path)
        if path.stat().st_size != entry["bytes"]:
            raise BundleError(f"{path}: size {path.stat().st_size} bytes, but {MANIFEST} says {entry['bytes']}; "
                              "the file was truncated or replaced after the bundle was written")
        actual = sha256_file(path)
        if actual != entry.get("sha256"):
            raise BundleError(
                f"{path}: sha256 mismatch (manifest {str(entry.get('sha256'))[:12]}..., file {actual[:12]}...); "
                "the file was modified or corrupted after the bundle was written"
            )
    if CONFIG not in files:
        raise BundleError(f"{directory / CONFIG}: not listed in {MANIFEST}")
    config = read_json(directory / CONFIG)
    _check_schema(directory / CONFIG, config, bundle_schema.CONFIG)
    model_file = config["image_encoder"]["file"]
    certificate = config.get("certificate")  # named in config.json: must be under the manifest too
    text = config.get("text_encoder") or {}
    named = (model_file, certificate, text.get("file"), text.get("tokenizer"))
    for name in REQUIRED_FILES + tuple(n for n in named if n):
        if name not in files:
            raise BundleError(f"{directory / name}: required file not listed in {MANIFEST}")
    if not model_file:
        raise BundleError(f"{directory / CONFIG}: names no image_encoder file")
    if certificate:
        _check_certificate_binds(directory, config, files)
    return config


def certified_files(certificate: Mapping[str, Any], config: Mapping[str, Any]) -> dict[str, Any]:
    """``{bundle file name: the sha256 the certificate vouches for}``: the image encoder, the head,
    the report and, when the certificate covers one, the text encoder and its tokenizer."""
    sha = certificate.get("sha256") if isinstance(certificate, Mapping) else None
    if not isinstance(sha, Mapping):
        raise BundleError(f"{CERTIFICATE}: no sha256 table; it certifies no file")
    out = {config["image_encoder"]["file"]: sha.get("image_encoder"), TEXT_EMBEDDINGS: sha.get("text_embeddings"),
           PARITY_REPORT: sha.get(PARITY_REPORT)}
    text, text_cfg = certificate.get("text_encoder"), config.get("text_encoder") or {}
    if text_cfg:
        text_sha = text.get("sha256") if isinstance(text, Mapping) else None
        if not isinstance(text_sha, Mapping):
            raise BundleError(f"{CERTIFICATE}: the bundle ships {text_cfg.get('file')} but the certificate "
                              "covers no text encoder")
        out[text_cfg["file"]] = text_sha.get("text_encoder")
        out[text_cfg["tokenizer"]] = text_sha.get("tokenizer")
    return out


def _check_certificate_binds(directory: Path, config: Mapping[str, Any], files: Mapping[str, Any]) -> None:
    """The certificate vouches for the files it names by sha256; the manifest only says the files
    were not changed after the bundle was written. A file swapped and the manifest re-hashed would
    otherwise still show the certificate's accuracy (``predict --info``)."""
    path = directory / config["certificate"]
    for name, want in certified_files(read_json(path), config).items():
        have = files.get(name, {}).get("sha256")  # the manifest's, which the file was just checked against
        if have != want:
            raise BundleError(f"{directory / name}: sha256 {str(have)[:12]}... is not the {str(want)[:12]}... that "
                              f"{path.name} certifies; this file is not the one that passed the parity gate")


def _check_schema(path: Path, document: Any, schema: bundle_schema.Validator) -> None:
    try:
        bundle_schema.check(document, schema)
    except bundle_schema.SchemaError as exc:
        raise BundleError(f"{path}: {exc}") from None


def _refuse_link(directory: Path, path: Path) -> None:
    """Bundle files must be plain files inside the bundle: a link could point anywhere, and the
    hash check would then vouch for a file the bundle does not contain. (The bundle directory
    itself may be a link, e.g. ``latest -> bundle-v3``.)"""
    if path.is_symlink():
        raise BundleError(f"{path}: is a symbolic link (to {os.readlink(path)}); a bundle holds plain files only")
    if not path.resolve().is_relative_to(directory.resolve()):
        raise BundleError(f"{path}: resolves outside the bundle directory (through a linked folder)")
