"""The command-line layer every entry point shares: a config dataclass filled from flags, checked by type."""
from __future__ import annotations

from dataclasses import dataclass

import pytest

from pkt.io import PKTError, config_entry, config_from_flags, fail, parse_list, parse_named


@dataclass
class Options:
    output_dir: str
    max_steps: int | None = None
    learning_rate: float = 3e-4
    resume: bool = False

    def __post_init__(self):
        if not self.learning_rate > 0:
            fail(f"--learning_rate {self.learning_rate}: must be > 0")


def test_flags_fill_the_config_with_their_types():
    cfg = config_from_flags(Options, {"output_dir": "out", "max_steps": 5, "learning_rate": 1, "resume": True})
    assert cfg == Options("out", 5, 1.0, True) and isinstance(cfg.learning_rate, float)


def test_a_number_given_for_a_path_is_a_path():
    assert config_from_flags(Options, {"output_dir": 123}).output_dir == "123"


@pytest.mark.parametrize("flags, message", [
    ({"output_dir": "o", "max_steps": "abc"}, "--max_steps 'abc': expected an integer"),
    ({"output_dir": "o", "max_steps": True}, "--max_steps True: expected an integer"),
    ({"output_dir": "o", "learning_rate": "fast"}, "--learning_rate 'fast': expected a number"),
    ({"output_dir": "o", "resume": "maybe"}, "--resume 'maybe': expected True or False"),
    ({"output_dir": "o", "learning_rate": -1}, "--learning_rate -1.0: must be > 0"),
    ({"output_dir": "o", "lerning_rate": 1}, "unknown flag --lerning_rate"),
])
def test_bad_flags_are_one_line_errors_naming_flag_and_value(flags, message):
    with pytest.raises(PKTError, match=message.replace("(", r"\(").replace(")", r"\)")):
        config_from_flags(Options, flags)


def test_entry_binds_positional_and_named_flags():
    entry = config_entry(lambda cfg: cfg, Options)
    assert entry("out", max_steps=2) == Options("out", 2)
    assert list(__import__("inspect").signature(entry).parameters) == ["output_dir", "max_steps", "learning_rate",
                                                                        "resume"]


@pytest.mark.parametrize("value", ["a,b", "[a, b]", ("a", "b"), ["a", "b", "a"]])
def test_list_flags_parse_every_spelling_fire_hands_over(value):
    assert parse_list(value, "--modules") == ["a", "b"]


def test_list_flags_check_values_and_emptiness():
    assert parse_list("[0.1, 0.2]", "--rates", float) == [0.1, 0.2]
    with pytest.raises(PKTError, match="--rates"):
        parse_list("x", "--rates", float)
    with pytest.raises(PKTError, match="unknown value 'c'"):
        parse_list("a,c", "--modules", choices=("a", "b"))
    with pytest.raises(PKTError, match="--modules is empty"):
        parse_list("", "--modules")


def test_named_flag_items_keep_order_take_a_default_name_and_refuse_a_name_twice():
    assert parse_named("a=x/1, b=y", "--runs") == [("a", "x/1"), ("b", "y")]
    assert parse_named(["out/eval/student"], "--runs", default_name=lambda d: d.rsplit("/", 1)[-1]) == \
        [("student", "out/eval/student")]
    assert parse_named({"gsm": "h.jsonl"}, "--nll_data") == [("gsm", "h.jsonl")]
    with pytest.raises(PKTError, match=r"^--runs: name 'a' given twice$"):
        parse_named("a=x,a=y", "--runs")
