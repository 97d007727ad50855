"""The model artifact round-trips, and refuses what it cannot trust with a clear error."""

from __future__ import annotations

import zipfile

import numpy as np
import pytest
import torch

from vql.model.artifact import ArtifactError, load_artifact, save_artifact
from vql.model.config import ModelConfig
from vql.model.encoder import VQLModel

SMALL = ModelConfig(item_buckets=64, category_buckets=16)


def test_round_trip_keeps_weights_config_and_version(tmp_path):
    model = VQLModel(SMALL)
    version = model.save(tmp_path / "m.npz")
    loaded, loaded_version = VQLModel.load(tmp_path / "m.npz", torch.device("cpu"))
    assert loaded_version == version and loaded.config == SMALL
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, loaded.state_dict()[name]), name


def test_same_config_gives_same_model_and_version(tmp_path):
    assert VQLModel(SMALL).save(tmp_path / "a.npz") == VQLModel(SMALL).save(tmp_path / "b.npz")
    assert VQLModel(SMALL).save(tmp_path / "c.npz") != VQLModel(SMALL.model_copy(update={"seed": 1})).save(tmp_path / "d.npz")


def test_refuses_a_missing_file(tmp_path):
    with pytest.raises(ArtifactError, match="does not exist"):
        load_artifact(tmp_path / "absent.npz")


def test_refuses_a_file_that_is_not_an_archive(tmp_path):
    (tmp_path / "m.npz").write_text("not a model")
    with pytest.raises(ArtifactError, match="not an .npz archive"):
        load_artifact(tmp_path / "m.npz")


def test_refuses_an_npz_that_is_not_an_artifact(tmp_path):
    np.savez(tmp_path / "m.npz", weights=np.zeros(3))
    with pytest.raises(ArtifactError, match="not a VQL model artifact"):
        load_artifact(tmp_path / "m.npz")


def test_refuses_weights_changed_after_saving(tmp_path):
    """A flipped weight no longer hashes to the stored version: corrupt, refused."""
    path = tmp_path / "m.npz"
    VQLModel(SMALL).save(path)
    with np.load(path) as npz:
        arrays = {name: npz[name].copy() for name in npz.files}
    arrays["codebooks"][0, 0, 0] += 1.0
    np.savez(path, **arrays)
    with pytest.raises(ArtifactError, match="corrupt"):
        load_artifact(path)


def test_refuses_a_truncated_file(tmp_path):
    path = tmp_path / "m.npz"
    VQLModel(SMALL).save(path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ArtifactError):
        load_artifact(path)


def test_refuses_weights_that_do_not_match_the_config(tmp_path):
    """An artifact whose arrays have other shapes than its config says cannot be loaded."""
    model = VQLModel(SMALL)
    arrays = {name: t.numpy() for name, t in model.state_dict().items()}
    arrays["codebooks"] = np.zeros((1, 2, 3), dtype=np.float32)
    save_artifact(tmp_path / "m.npz", SMALL, arrays)
    with pytest.raises(ArtifactError, match="does not match its own config"):
        VQLModel.load(tmp_path / "m.npz", torch.device("cpu"))


def test_saving_is_atomic(tmp_path):
    """The file is written aside and renamed: no temporary is left, the result is a zip."""
    VQLModel(SMALL).save(tmp_path / "m.npz")
    assert [p.name for p in tmp_path.iterdir()] == ["m.npz"]
    assert zipfile.is_zipfile(tmp_path / "m.npz")
