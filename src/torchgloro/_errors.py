"""Exception types raised by torchgloro.

Every error names the problem and, where there is one, the fix.
"""

from __future__ import annotations

__all__ = [
    "GloroError",
    "UnsupportedLayerError",
    "GloroInputError",
    "DatasetError",
    "CheckpointError",
    "ConfigError",
    "UnsoundBoundError",
]


class GloroError(Exception):
    """Base class of every torchgloro error."""


class UnsupportedLayerError(GloroError, TypeError):
    """A layer has no known Lipschitz bound, so nothing can be certified through it."""


class GloroInputError(GloroError, ValueError):
    """Bad user input: wrong shape, NaN/Inf, epsilon <= 0, label out of range."""


class InputShapeError(GloroInputError):
    """The backbone cannot run on the input shape it was given (``in_shape``)."""


class DatasetError(GloroError, OSError):
    """A dataset file is missing, corrupt, or in an unexpected format."""


class CheckpointError(GloroError, OSError):
    """A checkpoint is missing, corrupt, or belongs to another architecture/config."""


class ConfigError(GloroError, ValueError):
    """A configuration key or value is invalid."""


class UnsoundBoundError(GloroError, AssertionError):
    """A measured lower bound exceeded a claimed upper bound: a soundness bug."""
