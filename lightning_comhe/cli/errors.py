"""User-facing errors of the ``comhe`` command: printed as one ``error: ...`` line, without a traceback."""

__all__ = ["CLIError", "ConfigError", "DataError", "DataNotFoundError", "ModelError"]


class CLIError(Exception):
    """Base class of the errors that ``comhe`` reports as a single line (exit status 2).

    Set the environment variable ``COMHE_TRACEBACK=1`` to get the full traceback instead.
    """


class ConfigError(CLIError, ValueError):
    """An argument group of the command (``--comhe.*``, ``--report.*``) has a value its class refuses."""


class DataError(CLIError, ValueError):
    """A data folder exists but is not in the expected format."""


class DataNotFoundError(CLIError, FileNotFoundError):
    """A data folder or file does not exist."""


class ModelError(CLIError, ValueError):
    """A model cannot be created or loaded (unknown timm name, missing pretrained weights, bad checkpoint)."""
