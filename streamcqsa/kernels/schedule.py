"""Which leaves run at once, and when the work above them runs.

``kernels.tree`` and ``kernels.flat`` run a node's consecutive leaves at
once on the CPU (``threads.run_tasks``, each single-threaded inside), in
the groups ``leaf_groups`` makes; the fold or add above them may wait for
the next group and run beside it (``DEFER_FOLDS``). These choices move no
bits: every leaf's result is the same on any thread, and every fold or add
runs in the same order. Why each is made: docs/speed.md.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from streamcqsa.cqs.plan import Node
from streamcqsa.kernels import threads

# score entries (times batch and heads) from which a leaf left over at the end
# of a run of leaves at once is run split over the whole width instead
TAIL_MIN = 1 << 24

DEFER_FOLDS = True  # False: each fold or add runs as soon as its leaves are done (for comparison)

# a queued fold's cost for ``run_tasks``: taken after every leaf of its batch,
# by the first thread to run out of leaves, where it would otherwise wait
FOLD_COST = 0


def leaf_groups(nodes: Sequence[Node], device: torch.device, heads: int = 1) -> list[list[Node]]:
    """``nodes`` in order, in groups to run at once: each run of consecutive
    leaves is one group where tasks may run at once on ``device`` here
    (``threads.tasks_width``); every other node is a group of its own.

    So that the threads end a run together, its last leaves (as many as the
    width does not divide) are groups of their own, run one by one on the
    whole width, when each computes at least ``TAIL_MIN`` score entries over
    ``heads`` (batch entries times query heads); smaller ones gain less from
    that than they lose to its hand-overs and to a thread the OS sets aside.
    """
    w = threads.tasks_width(device)
    runs: list[list[Node]] = []
    for n in nodes:
        if w > 1 and n.is_leaf and runs and runs[-1][-1].is_leaf:
            runs[-1].append(n)
        else:
            runs.append([n])
    groups: list[list[Node]] = []
    for run in runs:
        cut = len(run) - len(run) % w
        tail = run[cut:] if len(run) > 1 else []
        if tail and all(n.blocks.entries * heads >= TAIL_MIN for n in tail):  # type: ignore[union-attr]
            groups += [run[:cut]] if cut else []
            groups += [[n] for n in tail]
        else:
            groups.append(run)
    return groups
