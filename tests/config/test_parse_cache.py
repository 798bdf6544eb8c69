"""parse_toml gives the same Config for the same text (pykata.config.parse._PARSED): safe only because a
Config is deeply immutable, which this checks, and only while the text is the same."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from pykata.config.load import load_config_file, packaged_default_text
from pykata.config.parse import _PARSED_MAX, parse_toml
from pykata.errors import ConfigError


def _mutable_parts(value: object, where: str) -> list[str]:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        if not type(value).__dataclass_params__.frozen:  # type: ignore[attr-defined]
            return [f"{where}: {type(value).__name__} is not frozen"]
        return [p for f in dataclasses.fields(value)
                for p in _mutable_parts(getattr(value, f.name), f"{where}.{f.name}")]
    if isinstance(value, (tuple, frozenset)):
        return [p for i, v in enumerate(value) for p in _mutable_parts(v, f"{where}[{i}]")]
    if value is None or isinstance(value, (str, bytes, int, float, bool)):
        return []
    return [f"{where}: {type(value).__name__}"]


def test_a_config_is_deeply_immutable() -> None:
    assert _mutable_parts(parse_toml(packaged_default_text(), source="<packaged default>"), "config") == []


def test_the_same_text_is_parsed_once_and_a_changed_file_anew(tmp_path: Path) -> None:
    text = packaged_default_text()
    first = parse_toml(text, source="<packaged default>")
    assert parse_toml(text, source="<packaged default>") is first
    assert parse_toml(text, source="elsewhere") is not first  # the source is part of the Config
    path = tmp_path / "configuration.toml"
    path.write_text(text)
    assert load_config_file(path) is load_config_file(path)
    path.write_text(text.replace("\nshim_fork_server = true\n", "\nshim_fork_server = false\n"))
    changed = load_config_file(path)
    assert changed.runtime.shim_fork_server is False and first.runtime.shim_fork_server is True
    # errors are never remembered: a bad text fails every time
    for _ in range(2):
        with pytest.raises(ConfigError, match=r"runtime\.shim_fork_server"):
            parse_toml(text.replace("\nshim_fork_server = true\n", '\nshim_fork_server = "yes"\n'))
    # bounded: many different texts do not pile up
    for i in range(_PARSED_MAX * 2):
        parse_toml(text + f"\n# {i}\n")
    assert parse_toml(text, source="<packaged default>") == first
