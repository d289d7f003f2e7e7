"""The run store: Zarr arrays for inputs, partials, outputs, gradients, progress."""

from streamcqsa.storage.layout import FORMAT_VERSION, Problem
from streamcqsa.storage.store import StoreError, create, create_random, fingerprint

__all__ = ["FORMAT_VERSION", "Problem", "StoreError", "create", "create_random", "fingerprint"]
