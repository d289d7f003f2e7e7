"""The run store: Zarr arrays for inputs, partials, outputs, gradients, progress."""

from streamcqsa.storage.inspect import Partial, Run, TaskStatus, open
from streamcqsa.storage.layout import FORMAT_VERSION, Problem
from streamcqsa.storage.store import StoreError, create, create_random, fingerprint

__all__ = [
    "FORMAT_VERSION",
    "Partial",
    "Problem",
    "Run",
    "StoreError",
    "TaskStatus",
    "create",
    "create_random",
    "fingerprint",
    "open",
]
