"""A task's block structure as data, the way FlexAttention's BlockMask is data.

A leaf task gathers a few contiguous runs of global tokens into one local
sequence. Every CQS level splits that local sequence into at most k contiguous
ranges (the chunks of that level) and masks the diagonal blocks of the chunks
the task does not own. The common refinement of those ranges gives at most
``itr * (k - 1) + 1`` *segments*, each contiguous in global positions too; the
mask is constant on every segment pair. Kernels only ever see ``Block``s:
rectangles (or causal triangles) of the local sequence that must be computed.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache


@dataclass(frozen=True)
class Segment:
    """A maximal run of a task's tokens that shares one chunk at every level."""

    start: int  # global position of the first token
    length: int
    local_start: int  # position inside the task's gathered sequence
    chunks: tuple[int, ...]  # chunk id at each level (level 1 first)

    @property
    def stop(self) -> int:
        return self.start + self.length

    @property
    def local_stop(self) -> int:
        return self.local_start + self.length


@dataclass(frozen=True)
class Block:
    """Queries ``[q_start, q_stop)`` attend keys ``[k_start, k_stop)`` (local).

    ``causal`` blocks are square diagonal blocks with the top-left causal mask;
    since a task's local order is the global order, that is exactly the global
    causal mask there. ``fresh`` says no earlier block of the task touched
    these rows, so a kernel may write instead of merge.
    """

    q_start: int
    q_stop: int
    k_start: int
    k_stop: int
    causal: bool = False
    fresh: bool = True

    @property
    def entries(self) -> int:
        """Score entries this block computes (the triangle for causal blocks)."""
        nq = self.q_stop - self.q_start
        if self.causal:
            return nq * (nq + 1) // 2
        return nq * (self.k_stop - self.k_start)


@dataclass(frozen=True)
class BlockList:
    """All blocks of one task, in the fixed order their partials are merged.

    ``empty_rows`` are local row ranges no block reaches (their partial is the
    merge identity).
    """

    length: int
    blocks: tuple[Block, ...]
    is_causal: bool
    empty_rows: tuple[tuple[int, int], ...] = ()

    @property
    def entries(self) -> int:
        return sum(b.entries for b in self.blocks)


# Relative throughput of CPU/GPU flash kernels by query rows per call: small
# query blocks use small tiles. Only the ranking matters to the cover below.
def _efficiency(rows: int, causal: bool) -> float:
    base = 0.71 if rows >= 768 else 0.62 if rows >= 192 else 0.56
    return base * (0.5 if causal else 1.0)


def build_blocks(
    segments: tuple[Segment, ...], owners: tuple[int, ...], is_causal: bool
) -> BlockList:
    """Blocks for a task whose level-l owned chunk is ``owners[l]``.

    Segment pair (s, t) is masked iff at some level both lie in the same chunk
    and the task does not own that chunk. The allowed segment pairs (below
    the diagonal when causal) are covered greedily by the rectangles and
    diagonal triangles that cost least per entry, so kernels see few, tall
    blocks and never a masked one.
    """
    n = len(segments)
    length = segments[-1].local_stop if segments else 0
    allowed = tuple(_allowed_mask(segments, s, owners) for s in range(n))
    lengths = tuple(seg.length for seg in segments)
    cover = _cover(allowed, lengths, is_causal)
    blocks: list[Block] = []
    touched = 0
    for ra, rz, ca, cz, tri in cover:
        rows = ((1 << rz) - 1) & ~((1 << ra) - 1)
        blocks.append(
            Block(
                q_start=segments[ra].local_start,
                q_stop=segments[rz - 1].local_stop,
                k_start=segments[ca].local_start,
                k_stop=segments[cz - 1].local_stop,
                causal=tri,
                fresh=not touched & rows,
            )
        )
        touched |= rows
    empty = tuple(
        (segments[a].local_start, segments[z - 1].local_stop)
        for a, z in _runs(~touched & ((1 << n) - 1), n)
    )
    return BlockList(length=length, blocks=tuple(blocks), is_causal=is_causal, empty_rows=empty)


@lru_cache(maxsize=4096)
def _cover(
    allowed: tuple[int, ...], lengths: tuple[int, ...], causal: bool
) -> tuple[tuple[int, int, int, int, bool], ...]:
    """Greedy cover of the allowed cells by (rows, cols, triangle) rectangles.

    Each step takes the candidate with the largest estimated time saving
    (entries over efficiency); segment counts are small (<= itr * (k-1) + 1).
    """
    n = len(allowed)
    remaining = [
        allowed[s] & (((1 << (s + 1)) - 1) if causal else -1) & ((1 << n) - 1) for s in range(n)
    ]
    starts = [0]
    for x in lengths:
        starts.append(starts[-1] + x)
    picked: list[tuple[int, int, int, int, bool]] = []
    while any(remaining):
        best: tuple[float, int, int, int, int, bool] | None = None
        for ra in range(n):
            cols = (1 << n) - 1
            if causal:
                cols &= (1 << ra) - 1  # rectangles strictly below the diagonal
            tri_ok = causal
            for rz in range(ra + 1, n + 1):
                r = rz - 1
                cols &= remaining[r]
                rows = starts[rz] - starts[ra]
                if tri_ok:
                    need = ((1 << (r + 1)) - 1) & ~((1 << ra) - 1)
                    tri_ok = remaining[r] & need == need
                    if tri_ok:
                        score = rows * (rows + 1) / 2 / _efficiency(rows, True)
                        cand = (score, ra, rz, ra, rz, True)
                        if best is None or cand[0] > best[0]:
                            best = cand
                if not cols and not tri_ok:
                    break
                for ca, cz in _runs(cols, n):
                    width = starts[cz] - starts[ca]
                    score = rows * width / _efficiency(rows, False)
                    if best is None or score > best[0]:
                        best = (score, ra, rz, ca, cz, False)
        assert best is not None
        _, ra, rz, ca, cz, tri = best
        for r in range(ra, rz):
            if tri:
                remaining[r] &= ~(((1 << (r + 1)) - 1) & ~((1 << ra) - 1))
            else:
                remaining[r] &= ~(((1 << cz) - 1) & ~((1 << ca) - 1))
        picked.append((ra, rz, ca, cz, tri))
    picked.sort()
    return tuple(picked)


def _allowed_mask(segments: tuple[Segment, ...], s: int, owners: tuple[int, ...]) -> int:
    """Bit t set iff segment s may attend segment t."""
    me = segments[s].chunks
    mask = 0
    for t, seg in enumerate(segments):
        ok = all(c != me[level] or c == owners[level] for level, c in enumerate(seg.chunks))
        if ok:
            mask |= 1 << t
    return mask


def _runs(mask: int, n: int) -> list[tuple[int, int]]:
    """Maximal runs [a, z) of set bits among the first n."""
    out: list[tuple[int, int]] = []
    t = 0
    while t < n:
        if mask >> t & 1:
            a = t
            while t < n and mask >> t & 1:
                t += 1
            out.append((a, t))
        else:
            t += 1
    return out
