"""The Dask graph over CQS units, resumable over a Zarr run store."""

from streamcqsa.pipeline.api import run, run_backward
from streamcqsa.pipeline.passes import clean_orphans
from streamcqsa.pipeline.repair import repair
from streamcqsa.pipeline.stats import RunStats
from streamcqsa.pipeline.verify import verify

__all__ = ["RunStats", "clean_orphans", "repair", "run", "run_backward", "verify"]
