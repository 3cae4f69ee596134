"""What `load_dual_encoder` says when a model cannot be found: the name, and what to do about it."""

import re

import pytest

from clipcore.dual_encoder import ModelNotFoundError
from clipcore.loading import load_dual_encoder
from distill import evaluate


def test_an_unknown_hub_id_offline_names_the_id_and_how_to_get_it(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotFoundError) as info:
        load_dual_encoder("example-org/no-such-clip")
    message = str(info.value)
    assert "'example-org/no-such-clip'" in message and "HF_HUB_OFFLINE=1" in message
    assert "huggingface-cli download example-org/no-such-clip --local-dir DIR" in message


@pytest.mark.parametrize("name", ["{tmp}/missing", "outputs/no-such-run/final", "./no-such-dir", "no-such-dir/"])
def test_a_missing_path_is_said_to_be_a_missing_directory(name, tmp_path):
    name = name.format(tmp=tmp_path)
    with pytest.raises(ModelNotFoundError, match=r"^" + re.escape(name) + r": no such directory"):
        load_dual_encoder(name)


def test_a_file_is_not_a_model(tmp_path):
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"\0" * 8)
    with pytest.raises(ModelNotFoundError, match=r"model\.safetensors: is a file; a model is a directory"):
        load_dual_encoder(str(weights))


def test_a_directory_without_a_model_says_so(tmp_path):
    (tmp_path / "notes.txt").write_text("not a model")
    with pytest.raises(ModelNotFoundError, match="directory is not a loadable Hugging Face model"):
        load_dual_encoder(str(tmp_path))


def test_the_cli_exits_2_naming_the_missing_model(tmp_path, capsys):
    missing = tmp_path / "no-such-model"
    code = evaluate.cli(["--model", str(missing), "--data", str(tmp_path), "--split", "test"])
    assert code == 2
    assert f"{missing}: no such directory" in capsys.readouterr().err
