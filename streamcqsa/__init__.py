"""Exact long-context attention by cyclic-quorum-set division."""

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
__version__ = "0.1.0"
