"""distill.typed_config on its own: every coercion, and every bad input naming its key or file."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from distill.config import TrainConfig
from distill.typed_config import ConfigError, parse_config


@dataclass
class Inner:
    n: int = 1
    on: bool = False


@dataclass
class Checked:
    x: float = 0.0

    def __post_init__(self):
        if self.x < 0:
            raise ValueError(f"x={self.x} must be >= 0")


@dataclass
class Root:
    name: str = "a"
    pair: tuple[float, float] = (0.9, 0.98)
    sizes: list[int] = field(default_factory=list)
    table: dict[str, int] = field(default_factory=dict)
    inner: Inner = field(default_factory=Inner)
    checked: Checked = field(default_factory=Checked)


def test_values_are_coerced_to_their_annotations():
    cfg = parse_config(Root, overrides=["pair=[0.5, 0.75]", "sizes=1,2,,3", "inner.on=yes", "inner.n=4",
                                        "name=007", "table={a: 1}"])
    assert cfg.pair == (0.5, 0.75) and cfg.sizes == [1, 2, 3] and cfg.inner == Inner(n=4, on=True)
    assert cfg.name == "007" and cfg.table == {"a": 1}  # "007" stays a string where a string is declared
    assert parse_config(Root, overrides=["inner.on=off"]).inner.on is False


def test_the_optimiser_betas_take_an_override():
    cfg = parse_config(TrainConfig, overrides=["optim.betas=[0.9, 0.95]"])
    assert cfg.optim.betas == (0.9, 0.95) and cfg.optim.lr == TrainConfig().optim.lr
    with pytest.raises(ConfigError, match=r"optim.betas: expected a list of 2 values"):
        parse_config(TrainConfig, overrides=["optim.betas=[0.9]"])


@pytest.mark.parametrize("override, message", [
    ("pair=0.5", r"pair: expected a list of 2 values, got 0.5"),
    ("sizes={a: 1}", r"sizes: expected a list \(or a comma-separated string\)"),
    ("table=[1, 2]", r"table: expected a mapping"),
    ("inner.on=maybe", r"inner.on: expected true/false, got 'maybe'"),
    ("inner.n=1.5", r"inner.n: expected int, got 1.5"),
    ("inner.n=true", r"inner.n: expected int, got True"),
    ("name=[1]", r"name: expected a string"),
    ("inner=3", r"inner is a section; set one of its keys: \['n', 'on'\]"),
    ("name.x=1", r"name is not a section"),
    ("checked.x=-1", r"checked.x=-1.0 must be >= 0"),
    ("nope=1", r"unknown config key 'nope'"),
    ("inner", r"override 'inner' is not of the form key=value"),
])
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        parse_config(Root, overrides=[override])


def test_bad_files_name_the_file(tmp_path):
    missing = tmp_path / "missing.yaml"
    with pytest.raises(ConfigError, match=f"config file {missing} does not exist"):
        parse_config(Root, missing)
    broken = tmp_path / "broken.yaml"
    broken.write_text("inner: [1, 2\n")
    with pytest.raises(ConfigError, match=rf"{broken}: invalid YAML"):
        parse_config(Root, broken)
    listed = tmp_path / "listed.yaml"
    listed.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match=rf"{listed}: expected a mapping of config keys at the top level, got a list"):
        parse_config(Root, listed)
    section = tmp_path / "section.yaml"
    section.write_text("inner: 3\n")
    with pytest.raises(ConfigError, match=r"inner: expected a mapping, got 3"):
        parse_config(Root, section)
