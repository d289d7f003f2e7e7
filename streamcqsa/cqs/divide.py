"""The recursive CQS divide: a pure plan of nodes, leaf tasks and their blocks.

A node's tokens are a sorted list of global runs. Dividing a node splits its
local sequence into n = k^2 - k + 1 chunks and makes n children; child i
gathers the chunks {(i + d) mod n : d in D}, in position order, and owns the
diagonal block of chunk i. Leaves carry the block structure a kernel needs;
inner nodes carry what a merge needs (which rows of the node each child holds).
Nothing here is per token: a node has O(itr * k) runs.

Rules that keep planning bounded at any ``itr``:

- A node with no work (every pair it holds is masked) is not divided: its
  children would split nothing, and it is left out of the plan.
- Once nodes get as short as a few tokens, a level can split no node's work:
  each node's only child with work holds the node's tokens and its work
  unchanged, and since every later level is the same, so would all deeper
  ones (each adds one more node per leaf, and a merge of one child). While
  the whole plan stays under ``MAX_FULL_DEPTH_NODES`` those levels are kept,
  so a plan never depends on that limit below it; past it ``divide`` stops
  at the first depth where no level splits anything (``Plan.itr``, with
  ``Plan.requested_itr`` recording what was asked): exactly the plan of that
  depth, which computes the same pairs.
- A plan estimated to pass ``MAX_PLAN_NODES`` is refused with a ValueError
  before it is built, and one that passes it while being built is refused
  then: it could not be built or run in reasonable time.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from streamcqsa.cqs.blocks import (
    Segment,
    allowed_masks,
    build_blocks,
    child_masks,
    cut_segments,
    work_entries,
)
from streamcqsa.cqs.interest import chunk_count, interest_set
from streamcqsa.cqs.plan import MergeSource, Node, Plan, Run

DEFAULT_TILE = 128
DEFAULT_QUORUM = 3
# Nodes a plan may have: well above the deepest plans the budget chooser
# considers at a billion tokens, far below what would exhaust memory.
MAX_PLAN_NODES = 1_000_000
# Levels that split no node's work are kept (the plan then has the depth asked
# for) while the plan stays this small; past it they are left out.
MAX_FULL_DEPTH_NODES = 20_000
# No sequence needs more levels than this (each level shrinks a node by k/n).
MAX_ITR = 1024


def divide(
    seq_len: int,
    itr: int,
    quorum: int | Sequence[int] = DEFAULT_QUORUM,
    *,
    is_causal: bool = False,
    tile: int = DEFAULT_TILE,
    interest_sets: Sequence[Sequence[int]] | None = None,
) -> Plan:
    """Divide ``seq_len`` tokens ``itr`` times; one quorum, or one per level.

    Chunk boundaries fall on multiples of ``tile`` (halved as needed) so that
    kernel tiles and store chunks rarely straddle segments. Empty nodes and
    leaves with nothing to compute are left out of the plan. Levels that
    would split no node's work are left out of large plans (see the module
    notes): ``Plan.itr`` is then below ``itr``. The quorum is checked even at
    ``itr=0``, where no level uses it (``check_quorum`` refuses it there).
    """
    seq_len = _check_int("seq_len", seq_len, minimum=1)
    itr = _check_int("itr", itr, minimum=0)
    if itr > MAX_ITR:
        raise ValueError(f"itr must be <= {MAX_ITR}, got {itr}")
    tile = _check_int("tile", tile, minimum=1)
    quorums = _quorums(quorum, itr)
    if interest_sets is None:
        sets = tuple(interest_set(k) for k in quorums)
    else:
        if len(interest_sets) != itr:
            raise ValueError(f"interest_sets has {len(interest_sets)} entries; itr is {itr}")
        sets = tuple(
            interest_set(k, candidate=d) for k, d in zip(quorums, interest_sets, strict=True)
        )
    _check_size(seq_len, quorums, sets, tile, bool(is_causal))
    build = _Builder(seq_len, quorums, sets, bool(is_causal), tile)
    root = (Segment(start=0, length=seq_len, local_start=0, chunks=()),)
    work = seq_len * (seq_len + 1) // 2 if is_causal else seq_len * seq_len
    build.node(root, (), ((0, seq_len),), work, allowed_masks(root, ()), itr, stop_when_stable=True)
    stable = [item.depth for item in build.out if isinstance(item, _Stable)]
    full = len(build.out) - len(stable) + sum(itr - d + 1 for d in stable)
    depth = itr if full <= MAX_FULL_DEPTH_NODES else build.deepest
    grow = _Builder(seq_len, quorums, sets, bool(is_causal), tile)
    for item in build.out:  # each stable node becomes its subtree of the plan's depth
        if isinstance(item, Node):
            grow.add(item, item.depth)
        else:
            grow.node(item.segments, item.path, item.parent_ranges, item.work, item.allowed, depth)
    nodes = grow.out
    return Plan(
        seq_len=seq_len,
        itr=depth,
        quorums=quorums[:depth],
        interest_sets=sets[:depth],
        is_causal=bool(is_causal),
        tile=tile,
        nodes=tuple(nodes),  # type: ignore[arg-type]
        requested_itr=itr,
    )


def quorum_for(itr: int, quorum: int | Sequence[int]) -> int | Sequence[int]:
    """The quorum for a plan of depth ``itr``: the default at ``itr=0`` (nothing
    is divided, and ``check_quorum`` refuses any other there), else ``quorum``.
    For callers that choose the depth themselves."""
    return quorum if itr else DEFAULT_QUORUM


def split_lengths(length: int, n: int, tile: int = DEFAULT_TILE) -> list[int]:
    """Split ``length`` into ``n`` contiguous chunk lengths on a tile grid.

    The grid is ``tile`` halved until every chunk can get at least one grid
    unit (down to 1). Units are spread evenly, earlier chunks getting the
    extra ones; the tail that is not a whole unit goes to the last chunk, so
    every boundary but the sequence end stays on the grid.
    """
    g = tile
    while g > 1 and length < n * g:
        g //= 2
    units, rest = divmod(length, g)
    base, extra = divmod(units, n)
    sizes = [(base + (1 if i < extra else 0)) * g for i in range(n)]
    sizes[-1] += rest
    return sizes


@dataclass(frozen=True)
class _Stable:
    """A node no later level can split (see ``_Builder.node``): placed where its
    subtree goes once the plan's depth is known."""

    segments: tuple[Segment, ...]
    path: tuple[int, ...]
    parent_ranges: tuple[Run, ...]
    work: int
    allowed: tuple[int, ...]

    @property
    def depth(self) -> int:
        return len(self.path)


class _Builder:
    """Builds subtrees in post-order into ``out``; ``deepest`` is the deepest
    depth at which a branch ended (a leaf, or a node no later level splits)."""

    def __init__(
        self,
        seq_len: int,
        quorums: tuple[int, ...],
        sets: tuple[tuple[int, ...], ...],
        is_causal: bool,
        tile: int,
    ) -> None:
        self.seq_len, self.quorums, self.sets = seq_len, quorums, sets
        self.is_causal, self.tile = is_causal, tile
        self.out: list[Node | _Stable] = []
        self.deepest = 0
        self._member_cache: dict[int, list[list[int]]] = {}
        # from this depth on every level is the same quorum and interest set
        self.uniform_from = len(quorums)
        while self.uniform_from > 0 and (
            self.uniform_from == len(quorums)
            or (quorums[self.uniform_from - 1], sets[self.uniform_from - 1])
            == (quorums[self.uniform_from], sets[self.uniform_from])
        ):
            self.uniform_from -= 1

    def _members(self, depth: int) -> list[list[int]]:
        """Per child of a node at ``depth``: the chunks it gathers, in order."""
        hit = self._member_cache.get(depth)
        if hit is None:
            n = chunk_count(self.quorums[depth])
            hit = [sorted((i + d) % n for d in self.sets[depth]) for i in range(n)]
            self._member_cache[depth] = hit
        return hit

    def add(self, item: Node | _Stable, depth: int) -> None:
        self.out.append(item)
        if len(self.out) > MAX_PLAN_NODES:
            raise _too_many(self.seq_len, len(self.quorums), self.quorums)
        if not isinstance(item, Node) or item.is_leaf:
            self.deepest = max(self.deepest, depth)

    def node(
        self,
        segments: tuple[Segment, ...],
        path: tuple[int, ...],
        parent_ranges: tuple[Run, ...],
        work: int,
        allowed: tuple[int, ...],
        levels: int,
        stop_when_stable: bool = False,
    ) -> None:
        """Append the subtree of a node with ``work`` > 0 score entries, ``levels`` deep.

        Children with no work are left out. With ``stop_when_stable``, a node
        whose only child with work holds all its tokens and all its work, at a
        depth from which every level is the same, is appended as a ``_Stable``
        instead: that child would be the node again, and so would its child.
        """
        depth = len(path)
        if depth == levels:
            blocks = build_blocks(segments, path, self.is_causal, allowed)
            self.add(
                Node(path=path, segments=segments, parent_ranges=parent_ranges, blocks=blocks),
                depth,
            )
            return
        n = chunk_count(self.quorums[depth])
        length = segments[-1].local_stop
        sizes = split_lengths(length, n, self.tile)
        starts = [0]
        for s in sizes[:-1]:
            starts.append(starts[-1] + s)
        chunks = tuple(zip(starts, sizes, strict=True))
        pieces = cut_segments(segments, chunks)  # per chunk: (parent segment, piece tagged with it)
        kids = []
        for i, members in enumerate(self._members(depth)):
            taken = [(c, p, seg) for c in members for p, seg in pieces[c]]
            if not taken:
                continue
            kid_allowed = child_masks(allowed, taken, i)
            kid_work = work_entries(
                [seg.length for _, _, seg in taken], kid_allowed, self.is_causal
            )
            if not kid_work:
                continue
            kid_segments = []
            pos = 0
            for _, _, seg in taken:
                kid_segments.append(
                    Segment(start=seg.start, length=seg.length, local_start=pos, chunks=seg.chunks)
                )
                pos += seg.length
            ranges = tuple(chunks[c] for c in members if sizes[c])
            kids.append((tuple(kid_segments), path + (i,), ranges, kid_work, kid_allowed))
        if (
            stop_when_stable
            and depth >= self.uniform_from
            and len(kids) == 1
            and kids[0][3] == work
            and kids[0][0][-1].local_stop == length
        ):
            self.add(_Stable(segments, path, parent_ranges, work, allowed), depth)
            return
        for kid in kids:
            self.node(*kid, levels, stop_when_stable)
        self.add(
            Node(
                path=path,
                segments=segments,
                parent_ranges=parent_ranges,
                children=tuple(k[1] for k in kids),
                chunks=chunks,
            ),
            depth,
        )


def _check_size(
    seq_len: int,
    quorums: tuple[int, ...],
    sets: tuple[tuple[int, ...], ...],
    tile: int,
    is_causal: bool,
) -> None:
    """Refuse, before building, a plan estimated to pass MAX_PLAN_NODES.

    Counts, level by level, the children that get tokens (from lengths
    alone). While nodes are long that is nearly every child with work. Once
    they are shorter than n it overcounts, so each level is capped at the
    allowed pairs (the nodes with work at one depth split them), and levels
    past a few below the last long node are not counted: by then no level
    splits anything and the plan stops (see ``divide``).
    """
    pairs = seq_len * (seq_len + 1) // 2 if is_causal else seq_len * seq_len
    level = {seq_len: 1}
    total, short_levels = 1, 0
    for k, members in zip(quorums, sets, strict=True):
        n = chunk_count(k)
        short_levels = short_levels + 1 if max(level) < n else 0
        if short_levels > 3:
            return
        nxt: dict[int, int] = {}
        for length, count in level.items():
            sizes = split_lengths(length, n, tile)
            for i in range(n):
                size = sum(sizes[(i + d) % n] for d in members)
                if size:
                    nxt[size] = nxt.get(size, 0) + count
        level = nxt
        total += min(sum(level.values()), pairs)
        if total > MAX_PLAN_NODES:
            raise _too_many(seq_len, len(quorums), quorums)


def _too_many(seq_len: int, itr: int, quorums: tuple[int, ...]) -> ValueError:
    return ValueError(
        f"itr={itr} with quorum {quorums[0] if quorums else DEFAULT_QUORUM} at "
        f"seq_len={seq_len} makes a plan "
        f"of more than {MAX_PLAN_NODES} nodes, too many to build or run; use a smaller itr "
        "(each level multiplies the tasks by n = k^2 - k + 1) or a larger quorum"
    )


def _quorums(quorum: int | Sequence[int], itr: int) -> tuple[int, ...]:
    if isinstance(quorum, (bool, float, str, bytes)):
        raise TypeError(f"quorum must be an int or a sequence of ints, got {quorum!r}")
    if isinstance(quorum, Sequence):
        qs = tuple(quorum)
        if len(qs) != itr:
            raise ValueError(f"quorum lists {len(qs)} levels but itr is {itr}")
    else:
        qs = (quorum,) * max(itr, 1)  # checked even at itr=0
    for k in qs:
        if isinstance(k, bool) or not isinstance(k, int):
            raise TypeError(f"quorum sizes must be ints, got {k!r}")
        interest_set(k)  # raises ValueError naming the nearest valid k
    return qs[:itr]


def check_quorum(quorum: int | Sequence[int], itr: int) -> None:
    """Refuse a quorum that cannot apply at depth ``itr``, for front ends that
    take both from a user.

    ``divide`` checks every quorum it is given, but at ``itr=0`` (one
    undivided task) it ignores a valid one, so that code choosing the depth
    can pass its quorum through; a user who asks for a quorum and no
    division gets this error instead.
    """
    _quorums(quorum, itr)
    if itr == 0 and not isinstance(quorum, Sequence) and quorum != DEFAULT_QUORUM:
        raise ValueError(
            f"quorum {quorum} has no effect with itr=0 (one undivided task); leave quorum "
            f"at its default ({DEFAULT_QUORUM}) or divide with itr >= 1"
        )


def _check_int(name: str, value: object, *, minimum: int) -> int:
    if isinstance(value, bool) or not hasattr(value, "__index__"):
        raise TypeError(f"{name} must be an integer, got {value!r}")
    v = int(value.__index__())  # type: ignore[attr-defined]
    if v < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {v}")
    return v


def work_ratio(plan: Plan) -> float:
    """Computed score entries over useful ones (1.0 means no redundant work)."""
    return plan.entries / plan.useful_entries


def dense_ratio(plan: Plan) -> float:
    """The paper's dense-leaf work over L^2 (e.g. (k^2/n)^itr when evenly split)."""
    return plan.dense_entries / (plan.seq_len**2)


__all__ = [
    "DEFAULT_QUORUM",
    "DEFAULT_TILE",
    "MAX_PLAN_NODES",
    "MergeSource",
    "Node",
    "Plan",
    "dense_ratio",
    "check_quorum",
    "divide",
    "quorum_for",
    "split_lengths",
    "work_ratio",
]
