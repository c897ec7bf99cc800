"""Errors a worker raises while starting that are the caller's doing, kept torch-free so that the CLI
(which reports them as one line, cli_errors.py) can name them without importing the engine."""


class EngineSettingRefused(ValueError):
    """The engine refused a setting at load (MTP without MTP weights, fa3 on a CPU, ...)."""
