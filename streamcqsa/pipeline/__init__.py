"""The Dask graph over CQS tasks, resumable over a Zarr run store."""

from streamcqsa.pipeline.run import clean_orphans, run, run_backward

__all__ = ["clean_orphans", "run", "run_backward"]
