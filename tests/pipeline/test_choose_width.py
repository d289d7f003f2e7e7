"""The width a pipeline's units run their leaves at, as the unit model counts it."""

from __future__ import annotations

import os

from streamcqsa.pipeline.context import leaf_width, slot_threads


def test_leaf_width_is_the_slot_threads_only_where_leaves_run_at_once() -> None:
    cores = os.cpu_count() or 1
    assert slot_threads(None, 2) == max(1, cores // 2)
    assert slot_threads(3, 2) == 3
    assert leaf_width("cpu", None, 1, None) == max(1, cores)
    assert leaf_width("cpu", 4, 2, None) == 4
    assert leaf_width("cpu", 4, 2, 1 << 30) == 1  # under a memory budget: one at a time
