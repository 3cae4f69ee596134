"""optim.ema_decay's arithmetic, its checkpoint file, and its config errors (the training runs: tests/test_train.py)."""

from pathlib import Path

import pytest
import torch
from torch import nn

from distill.config import ConfigError, load_config
from distill.ema import EMA_FILE, StudentEMA, attach_ema, checkpoint_writers

REPO = Path(__file__).resolve().parents[1]


def _net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))


def _step(net: nn.Module, seed: int) -> None:
    """Move every weight and the batch-norm statistics, as a training step would."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn(p.shape, generator=g))
    net.train()
    net(torch.randn(8, 4, generator=g))  # updates running_mean / running_var


def test_the_average_is_a_copy_then_an_exponential_moving_average():
    live, decay = _net(), 0.75
    ema = StudentEMA(live, decay)
    assert all(not p.requires_grad for p in ema.student.parameters()) and not ema.student.training
    _step(live, 1)
    ema.update(live)  # the first update copies
    expected = {k: v.clone() for k, v in live.state_dict().items()}
    assert ema.updates == 1
    for step in (2, 3, 4):
        _step(live, step)
        ema.update(live)
        for k, v in live.state_dict().items():
            if v.is_floating_point():
                expected[k] = decay * expected[k] + (1 - decay) * v
    got = ema.student.state_dict()
    for k in ("0.weight", "0.bias", "1.weight", "1.running_mean", "1.running_var"):
        torch.testing.assert_close(got[k], expected[k])
        assert not torch.equal(got[k], live.state_dict()[k])  # the average, not the live weights
    assert ema.updates == 4


def test_the_average_survives_a_checkpoint_round_trip(tmp_path):
    live = _net()
    ema = StudentEMA(live, 0.9)
    for step in (1, 2, 3):
        _step(live, step)
        ema.update(live)
    ema.save(tmp_path)
    assert (tmp_path / EMA_FILE).is_file()
    resumed = StudentEMA(_net(seed=5), 0.9)  # another start: everything must come from the file
    resumed.load(tmp_path)
    assert resumed.updates == 3
    for k, v in ema.student.state_dict().items():
        assert torch.equal(resumed.student.state_dict()[k], v), k
    _step(live, 4)
    ema.update(live)
    resumed.update(live)  # continues the same average (not a fresh copy of the live weights)
    torch.testing.assert_close(resumed.student.state_dict()["0.weight"], ema.student.state_dict()["0.weight"])


def test_a_checkpoint_without_or_with_another_average_is_refused_by_name(tmp_path):
    with pytest.raises(ConfigError, match=EMA_FILE):
        StudentEMA(_net(), 0.9).load(tmp_path)
    other = StudentEMA(nn.Sequential(nn.Linear(4, 5)), 0.9)
    other.save(tmp_path)
    with pytest.raises(ConfigError, match="not an average of this student"):
        StudentEMA(_net(), 0.9).load(tmp_path)


def test_decay_zero_means_no_average_and_bad_decays_are_config_errors():
    assert attach_ema(0.0, _net()) is None
    with pytest.raises(ConfigError, match="optim.ema_decay"):
        StudentEMA(_net(), 1.0)
    for bad in ("1.0", "-0.1"):
        with pytest.raises(ConfigError, match=r"optim.ema_decay"):
            load_config(None, [f"optim.ema_decay={bad}"])
    with pytest.raises(ConfigError, match="qat.enabled"):
        load_config(REPO / "configs" / "general_qat.yaml", ["optim.ema_decay=0.999"])


def test_checkpoint_writers_run_every_writer_and_none_is_none(tmp_path):
    assert checkpoint_writers(None, None) is None
    seen = []
    write = checkpoint_writers(lambda d: seen.append(("a", d)), None, lambda d: seen.append(("b", d)))
    write(tmp_path)
    assert seen == [("a", tmp_path), ("b", tmp_path)]
