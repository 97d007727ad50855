"""The model artifact: config + weights + codebooks + a version hash, in one .npz file.

numpy's npz (a zip of .npy arrays, loaded with ``allow_pickle=False``) keeps the file safe to
open and readable without torch, so the scorer of a ranking backend can load it too. The
version is a hash of the config and every array: states are stamped with it, and a worker or
scorer refuses a state or store of another version.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydantic import ValidationError

from vql.model.config import ModelConfig

FORMAT = "vql-model/1"
_CONFIG_KEY = "__config__"
_VERSION_KEY = "__version__"


class ArtifactError(ValueError):
    """The file is not a usable model artifact; the message says why."""


@dataclass(frozen=True)
class Artifact:
    config: ModelConfig
    arrays: dict[str, np.ndarray]
    version: str


def model_version(config: ModelConfig, arrays: dict[str, np.ndarray]) -> str:
    """16 hex characters identifying config and weights (sha256, order-independent)."""
    digest = hashlib.sha256(FORMAT.encode())
    digest.update(config.model_dump_json().encode())
    for name in sorted(arrays):
        array = np.ascontiguousarray(arrays[name])
        digest.update(f"{name}:{array.dtype.str}:{array.shape}".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()[:16]


def save_artifact(path: str | Path, config: ModelConfig, arrays: dict[str, np.ndarray]) -> str:
    """Write the artifact atomically (a reader never sees half a file); return its version."""
    path = Path(path)
    version = model_version(config, arrays)
    meta = {_CONFIG_KEY: _text_array(json.dumps({"format": FORMAT, "config": config.model_dump()})),
            _VERSION_KEY: _text_array(version)}
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as out:
            np.savez(out, **arrays, **meta)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return version


def load_artifact(path: str | Path) -> Artifact:
    """Load and verify an artifact; raise :class:`ArtifactError` with the reason otherwise."""
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"model artifact {path} does not exist (create one: vql model init)")
    if not zipfile.is_zipfile(path):
        raise ArtifactError(f"{path} is not a VQL model artifact (not an .npz archive)")
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {name: npz[name] for name in npz.files}
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as exc:
        raise ArtifactError(f"{path} is not a VQL model artifact: {exc}") from exc
    if _CONFIG_KEY not in arrays or _VERSION_KEY not in arrays:
        raise ArtifactError(f"{path} is an npz file but not a VQL model artifact")
    try:
        meta = json.loads(_array_text(arrays.pop(_CONFIG_KEY)))
        if meta.get("format") != FORMAT:
            raise ArtifactError(f"{path} has format {meta.get('format')!r}, expected {FORMAT!r}")
        config = ModelConfig.model_validate(meta["config"])
    except (ValueError, KeyError, ValidationError) as exc:
        if isinstance(exc, ArtifactError):
            raise
        raise ArtifactError(f"{path} has an unreadable config: {exc}") from exc
    stored = _array_text(arrays.pop(_VERSION_KEY))
    actual = model_version(config, arrays)
    if stored != actual:
        raise ArtifactError(
            f"{path} is corrupt: its content hashes to {actual}, but it claims version {stored}"
        )
    return Artifact(config=config, arrays=arrays, version=stored)


def _text_array(text: str) -> np.ndarray:
    return np.frombuffer(text.encode(), dtype=np.uint8)


def _array_text(array: np.ndarray) -> str:
    return array.astype(np.uint8).tobytes().decode()
