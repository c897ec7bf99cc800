"""Every flag of every `glmserve` command has help text, and `--help` shows its default where it has one."""

from __future__ import annotations

import argparse
import pytest

from glmserve import cli


def _parsers() -> dict[str, argparse.ArgumentParser]:
    top = cli.build_parser()
    subs = next(a for a in top._actions if isinstance(a, argparse._SubParsersAction)).choices
    return {"glmserve": top, **{f"glmserve {name}": p for name, p in subs.items()}}


def _options(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    return [a for a in parser._actions
            if a.option_strings and not isinstance(a, argparse._HelpAction) and a.help is not argparse.SUPPRESS]


def _has_default(action: argparse.Action) -> bool:
    return action.default not in (None, False, argparse.SUPPRESS)


PARSERS = _parsers()


def test_every_command_is_walked():
    assert {"glmserve up", "glmserve serve", "glmserve router", "glmserve prefill", "glmserve decode",
            "glmserve bench", "glmserve operator", "glmserve demo", "glmserve tiny-model"} <= set(PARSERS)


@pytest.mark.parametrize("name", sorted(PARSERS))
def test_every_option_has_help_with_its_default(name):
    parser = PARSERS[name]
    options = _options(parser)
    assert options
    missing = [a.option_strings[0] for a in options if not (a.help or "").strip()]
    assert not missing, f"{name}: options without help: {missing}"
    for action in options:
        if not _has_default(action):
            continue
        formatter = parser._get_formatter()
        shown = " ".join(formatter._format_action(action).split())  # argparse wraps long lines
        want = f"(default: {action.default})"
        assert want in shown, f"{name} {action.option_strings[0]}: help does not show {want}: {shown!r}"


@pytest.mark.parametrize("name", sorted(n.split(" ", 1)[1] for n in PARSERS if " " in n))
def test_help_of_each_command_exits_0_and_lists_the_defaults(name, capsys):
    """What a user types: `glmserve CMD --help`."""
    with pytest.raises(SystemExit) as exit_info:
        cli.main([name, "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    with_default = sum(_has_default(a) for a in _options(PARSERS[f"glmserve {name}"]))
    assert text.startswith(f"usage: glmserve {name}") and text.count("(default: ") >= with_default
