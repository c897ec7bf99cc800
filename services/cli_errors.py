"""How `glmserve` reports a user's mistake: one line on stderr and exit code 2, no usage dump, no traceback."""

from __future__ import annotations

import argparse
import sys

from glmserve.engine.memory_check import ModelTooLarge
from glmserve.launcher import StartupFailed


class OneLineParser(argparse.ArgumentParser):
    """argparse, but an unknown or bad flag is one line that says where to look."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


# Failures that are the caller's input, not a bug: reported as one line.
USER_ERRORS = (FileNotFoundError, NotADirectoryError, ModelTooLarge, StartupFailed)


def report(command: str, exc: BaseException) -> int:
    print(f"glmserve {command}: error: {exc}", file=sys.stderr, flush=True)
    return 2


def add_default_help(parser: argparse.ArgumentParser) -> None:
    """Every flag's help ends with its default, in every subcommand (argparse shows none by itself)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                add_default_help(sub)
        elif action.option_strings and action.default is not argparse.SUPPRESS and action.help is not argparse.SUPPRESS:
            text = action.help or ""
            if "%(default)" not in text and "default" not in text:
                text = f"{text} (default: %(default)s)".strip()
            action.help = text
