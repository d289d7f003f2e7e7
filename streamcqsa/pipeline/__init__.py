"""The Dask graph over CQS tasks, resumable over a Zarr run store."""

from streamcqsa.pipeline.repair import repair
from streamcqsa.pipeline.run import clean_orphans, run, run_backward
from streamcqsa.pipeline.verify import verify

__all__ = ["clean_orphans", "repair", "run", "run_backward", "verify"]
