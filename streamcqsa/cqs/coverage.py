"""Coverage checks for a plan: every allowed (query, key) pair exactly once.

``pair_counts`` is a test tool for small L: it expands every block of every
task into global coordinates and counts. ``check_totals`` is the O(#blocks)
check that works at any L.
"""

from __future__ import annotations

import numpy as np

from streamcqsa.cqs.divide import Node, Plan

MAX_DENSE_CHECK = 4096


def local_to_global(task: Node) -> np.ndarray:
    """Global position of each of a task's local tokens (small tasks only)."""
    return np.concatenate([np.arange(s.start, s.stop, dtype=np.int64) for s in task.segments])


def pair_counts(plan: Plan) -> np.ndarray:
    """How many tasks compute each (query, key) pair; an L x L int array."""
    n = plan.seq_len
    if n > MAX_DENSE_CHECK:
        raise ValueError(f"pair_counts is for small L (<= {MAX_DENSE_CHECK}); got {n}")
    counts = np.zeros((n, n), dtype=np.int32)
    for task in plan.tasks:
        pos = local_to_global(task)
        for b in task.blocks.blocks:  # type: ignore[union-attr]
            qs = pos[b.q_start : b.q_stop]
            ks = pos[b.k_start : b.k_stop]
            sub = np.ones((len(qs), len(ks)), dtype=np.int32)
            if b.causal:
                sub = np.tril(sub)
            counts[np.ix_(qs, ks)] += sub
    return counts


def check_coverage(plan: Plan) -> None:
    """Raise AssertionError unless every allowed pair is computed exactly once."""
    counts = pair_counts(plan)
    expected = np.ones_like(counts)
    if plan.is_causal:
        expected = np.tril(expected)
    bad = np.argwhere(counts != expected)
    if len(bad):
        q, k = bad[0]
        raise AssertionError(
            f"{len(bad)} pairs covered wrongly; e.g. (q={q}, k={k}) computed "
            f"{counts[q, k]} times, expected {expected[q, k]}"
        )


def check_totals(plan: Plan) -> None:
    """Cheap necessary condition at any L: computed entries equal useful ones."""
    if plan.entries != plan.useful_entries:
        raise AssertionError(
            f"plan computes {plan.entries} entries, expected {plan.useful_entries}"
        )
