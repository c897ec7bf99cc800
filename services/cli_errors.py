"""How `glmserve` reports a user's mistake: one line on stderr and exit code 2, no usage dump, no traceback."""

from __future__ import annotations

import argparse
import sys

from glmserve.engine.memory_check import ModelTooLarge
from glmserve.launcher import StartupFailed
from glmserve.worker.errors import EngineSettingRefused


class OneLineParser(argparse.ArgumentParser):
    """argparse, but an unknown or bad flag is one line that says where to look."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


# Failures that are the caller's input, not a bug: reported as one line.
USER_ERRORS = (FileNotFoundError, NotADirectoryError, ModelTooLarge, StartupFailed, EngineSettingRefused)


def report(command: str, exc: BaseException) -> int:
    print(f"glmserve {command}: error: {exc}", file=sys.stderr, flush=True)
    return 2
