"""Pure CQS planning: interest sets, the recursive divide, block structure.

No torch and no I/O here, so plans can be built, inspected and property
tested anywhere.
"""

from streamcqsa.cqs.blocks import Block, BlockList, Segment
from streamcqsa.cqs.coverage import check_coverage, check_totals, pair_counts
from streamcqsa.cqs.divide import (
    MergeSource,
    Node,
    Plan,
    check_quorum,
    dense_ratio,
    divide,
    quorum_for,
    split_lengths,
    work_ratio,
)
from streamcqsa.cqs.interest import chunk_count, interest_set, is_difference_set, valid_quorums

__all__ = [
    "Block",
    "BlockList",
    "MergeSource",
    "Node",
    "Plan",
    "Segment",
    "check_quorum",
    "check_coverage",
    "check_totals",
    "chunk_count",
    "dense_ratio",
    "divide",
    "interest_set",
    "is_difference_set",
    "pair_counts",
    "quorum_for",
    "split_lengths",
    "valid_quorums",
    "work_ratio",
]
