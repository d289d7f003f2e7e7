"""Exact long-context attention by cyclic-quorum-set division."""

from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as _version

from streamcqsa.attention import attention
from streamcqsa.cqs import divide, interest_set
from streamcqsa.cqs.budget import Budget, Estimate
from streamcqsa.cqs.budget import choose as plan
from streamcqsa.errors import (
    CorruptChunkError,
    DeviceOOM,
    DiskFullError,
    InputsChangedError,
    MissingChunkError,
    PlanMismatchError,
    StoreBusyError,
    StoreError,
    StreamCQSAError,
)

__all__ = [
    "Budget",
    "CorruptChunkError",
    "DeviceOOM",
    "DiskFullError",
    "Estimate",
    "InputsChangedError",
    "MissingChunkError",
    "PlanMismatchError",
    "StoreBusyError",
    "StoreError",
    "StreamCQSAError",
    "attention",
    "divide",
    "interest_set",
    "plan",
]
try:  # the installed distribution's version (pyproject.toml), never a second copy
    __version__ = _version("stream-cqsa")
except PackageNotFoundError:  # imported from a source tree that was never installed
    __version__ = "0+unknown"
