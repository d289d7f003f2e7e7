"""One task's attention on one device: forward -> (out, lse), backward -> grads."""

from streamcqsa.kernels.backend import BACKENDS, Backend, get_backend
from streamcqsa.kernels.merge import empty_partial, merge_partials, normalize_empty_rows
from streamcqsa.kernels.runner import WorkCounter, backward, forward

__all__ = [
    "BACKENDS",
    "Backend",
    "WorkCounter",
    "backward",
    "empty_partial",
    "forward",
    "get_backend",
    "merge_partials",
    "normalize_empty_rows",
]
