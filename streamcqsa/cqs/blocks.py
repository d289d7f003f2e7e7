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
    causal mask there.
    """

    q_start: int
    q_stop: int
    k_start: int
    k_stop: int
    causal: bool = False

    @property
    def entries(self) -> int:
        """Score entries this block computes (the triangle for causal blocks)."""
        nq = self.q_stop - self.q_start
        if self.causal:
            return nq * (nq + 1) // 2
        return nq * (self.k_stop - self.k_start)


@dataclass(frozen=True)
class BlockList:
    """All blocks of one task, grouped by query range in local order.

    Blocks that share a query range are listed together so that a kernel can
    fold their partials into those rows in a fixed order.
    """

    length: int
    blocks: tuple[Block, ...]
    is_causal: bool

    @property
    def entries(self) -> int:
        return sum(b.entries for b in self.blocks)

    def query_groups(self) -> tuple[tuple[int, int, tuple[Block, ...]], ...]:
        """``(q_start, q_stop, blocks)`` for each query range, in order."""
        groups: list[tuple[int, int, list[Block]]] = []
        for b in self.blocks:
            if groups and groups[-1][0] == b.q_start and groups[-1][1] == b.q_stop:
                groups[-1][2].append(b)
            else:
                groups.append((b.q_start, b.q_stop, [b]))
        return tuple((a, z, tuple(bs)) for a, z, bs in groups)


def build_blocks(
    segments: tuple[Segment, ...], owners: tuple[int, ...], is_causal: bool
) -> BlockList:
    """Blocks for a task whose level-l owned chunk is ``owners[l]``.

    Segment pair (s, t) is masked iff at some level both lie in the same chunk
    and the task does not own that chunk. Consecutive query segments with the
    same key set share one query range, so a kernel sees few, large blocks.
    """
    n = len(segments)
    length = segments[-1].local_stop if segments else 0
    allowed = [_allowed_mask(segments, s, owners) for s in range(n)]
    blocks: list[Block] = []
    s = 0
    while s < n:
        if is_causal:
            e = _causal_group_end(allowed, s)
            before = allowed[s] & ((1 << s) - 1)
            for a, z in _runs(before, n):
                blocks.append(_block(segments, s, e, a, z, False))
            if allowed[s] >> s & 1:
                blocks.append(_block(segments, s, e, s, e, True))
        else:
            e = s + 1
            while e < n and allowed[e] == allowed[s]:
                e += 1
            for a, z in _runs(allowed[s], n):
                blocks.append(_block(segments, s, e, a, z, False))
        s = e
    return BlockList(length=length, blocks=tuple(blocks), is_causal=is_causal)


def _allowed_mask(segments: tuple[Segment, ...], s: int, owners: tuple[int, ...]) -> int:
    """Bit t set iff segment s may attend segment t."""
    me = segments[s].chunks
    mask = 0
    for t, seg in enumerate(segments):
        ok = all(c != me[level] or c == owners[level] for level, c in enumerate(seg.chunks))
        if ok:
            mask |= 1 << t
    return mask


def _causal_group_end(allowed: list[int], s: int) -> int:
    """Extend a causal query group while one triangle plus one key set still fits.

    Segments s..e-1 can share calls if they all see the same keys before s and
    see each other (then the group's diagonal is one causal triangle), or if
    none of them sees its own group (no triangle at all).
    """
    n = len(allowed)
    prefix = (1 << s) - 1
    diag = allowed[s] >> s & 1
    e = s + 1
    while e < n and allowed[e] & prefix == allowed[s] & prefix:
        group = allowed[e] & ((1 << (e + 1)) - 1) & ~prefix
        full = ((1 << (e + 1)) - 1) & ~prefix
        if group != (full if diag else 0):
            break
        e += 1
    return e


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


def _block(
    segments: tuple[Segment, ...], qa: int, qz: int, ka: int, kz: int, causal: bool
) -> Block:
    return Block(
        q_start=segments[qa].local_start,
        q_stop=segments[qz - 1].local_stop,
        k_start=segments[ka].local_start,
        k_stop=segments[kz - 1].local_stop,
        causal=causal,
    )
