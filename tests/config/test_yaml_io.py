"""The limits every YAML input is read under: checked on the event stream, before objects are built."""

from __future__ import annotations

import pytest

from rcnn_lab.config.yaml_io import MAX_BYTES, MAX_DEPTH, MAX_NODES, check_limits, read_yaml, safe_load
from rcnn_lab.errors import ConfigError


def _nested(depth: int) -> str:
    return "[" * depth + "1" + "]" * depth


def test_nesting_up_to_the_limit_loads_and_one_more_level_is_refused():
    value = safe_load(_nested(MAX_DEPTH))
    for _ in range(MAX_DEPTH):
        value = value[0]
    assert value == 1
    assert "nests deeper than" in check_limits(_nested(MAX_DEPTH + 1))
    assert "nests deeper than" in check_limits(_nested(100_000))  # past libyaml's own limit too


def test_alias_expansion_is_counted_not_the_text():
    reuse = "base: &b {lr: 0.1, momentum: 0.9}\na: *b\nb: *b\n"
    assert check_limits(reuse) is None and safe_load(reuse)["b"] == {"lr": 0.1, "momentum": 0.9}
    width = 10
    levels = [f"l0: &l0 [{', '.join(['x'] * width)}]"]
    levels += [f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * width)}]" for i in range(1, 6)]
    text = "\n".join(levels)  # ~400 characters that expand to 10**6 values
    assert len(text) < 500 and "through its aliases" in check_limits(text)
    under = "\n".join(levels[:3])  # 1,111 values
    assert MAX_NODES > 1_111 and check_limits(under) is None


def test_size_is_checked_before_reading(tmp_path):
    path = tmp_path / "big.yaml"
    path.write_text("name: t\n" + "#" * MAX_BYTES)
    with pytest.raises(ConfigError) as info:
        read_yaml(path, "big.yaml")
    assert str(info.value).startswith("big.yaml: file is ") and "limited to" in str(info.value)


def test_not_utf8_names_the_line(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes("name: t\ndescription: caf\xe9\n".encode("latin-1"))
    with pytest.raises(ConfigError) as info:
        read_yaml(path, "latin1.yaml")
    assert str(info.value) == "latin1.yaml: not UTF-8 text (byte 0xe9 at line 2); save it as UTF-8 YAML"


def test_limits_name_the_source_and_key():
    with pytest.raises(ConfigError) as info:
        safe_load(_nested(MAX_DEPTH + 1), "--set", "model.rpn")
    (p,) = info.value.problems
    assert (p.file, p.path) == ("--set", "model.rpn")
