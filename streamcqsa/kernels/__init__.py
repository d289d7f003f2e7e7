"""One task's attention on one device: forward -> (out, lse), backward -> grads."""

from streamcqsa.kernels.backend import BACKENDS, Backend, get_backend
from streamcqsa.kernels.merge import empty_partial, merge_partials, normalize_empty_rows
from streamcqsa.kernels.runner import WorkCounter, backward, forward
from streamcqsa.kernels.workspace import Workspace, cached_bytes, empty_cache, set_cache_limit

__all__ = [
    "BACKENDS",
    "Backend",
    "WorkCounter",
    "Workspace",
    "backward",
    "cached_bytes",
    "empty_cache",
    "empty_partial",
    "forward",
    "get_backend",
    "merge_partials",
    "normalize_empty_rows",
    "set_cache_limit",
]
