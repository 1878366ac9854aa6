"""Exceptions pie_lib raises for bad input. Each message names the problem and the fix."""

from __future__ import annotations


class PieError(Exception):
    """Base class: a user-facing error whose message is a complete one-line explanation."""


class CLTFormatError(PieError):
    """A CLT folder/file is missing, corrupt, or has tensors of the wrong shape/dtype."""


class ShapeMismatchError(PieError):
    """Two objects (model and CLT, clean and corrupted prompt...) do not fit together."""


class UnknownArchitectureError(PieError):
    """The model's architecture has no entry in the architecture table."""


class DataFormatError(PieError):
    """A data file (JSONL pairs, selections...) is malformed."""


class BudgetError(PieError):
    """A budget K or a method list is invalid."""


class ConfigMismatchError(PieError):
    """An output folder holds results produced under a different configuration."""


class WeightsUnavailableError(PieError):
    """Model or CLT weights cannot be found locally or fetched from the hub."""


class LLMConfigError(PieError):
    """An LLM backend is misconfigured (no model name, no API key, unknown backend)."""


class LLMRequestError(PieError):
    """An LLM request failed for good (after retries); the message never contains the API key."""


class MissingDependencyError(PieError):
    """An optional package (datasets, openai...) is needed for this and is not installed."""


class SettingError(PieError):
    """A run setting has an invalid value (batch size, chunk, device, dtype, a method parameter...)."""


class OutputPathError(PieError):
    """The output folder cannot be used (it is a file, lies under a file, or holds an unreadable config)."""


class NumericalError(PieError):
    """A model or CLT produced NaN/Inf values (corrupt weights, or a dtype that overflows)."""


class FolderBusyError(PieError):
    """Another live run is writing the same output folder (and shard)."""
