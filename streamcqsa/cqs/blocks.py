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

from collections.abc import Sequence
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
    segments: tuple[Segment, ...],
    owners: tuple[int, ...],
    is_causal: bool,
    allowed: tuple[int, ...] | None = None,
) -> BlockList:
    """Blocks for a task whose level-l owned chunk is ``owners[l]``.

    Segment pair (s, t) is masked iff at some level both lie in the same chunk
    and the task does not own that chunk. The allowed segment pairs (below
    the diagonal when causal) are covered greedily by the rectangles and
    diagonal triangles that cost least per entry, so kernels see few, tall
    blocks and never a masked one. ``allowed`` is ``allowed_masks(segments,
    owners)`` if the caller has it.
    """
    n = len(segments)
    length = segments[-1].local_stop if segments else 0
    if allowed is None:
        allowed = allowed_masks(segments, owners)
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


def allowed_masks(segments: tuple[Segment, ...], owners: tuple[int, ...]) -> tuple[int, ...]:
    """Per segment s, bit t set iff segment s may attend segment t.

    A pair is masked iff at some level both segments lie in one chunk the
    task does not own, so each segment's mask is everything but the union,
    over the levels it is not owned at, of the segments sharing its chunk.
    Segments come in position order, so a chunk's segments are runs of it.
    """
    n = len(segments)
    if not n:
        return ()
    ids = [seg.chunks for seg in segments]
    masked = [0] * n
    for level, own in enumerate(owners):
        runs: list[tuple[int, int, int]] = []  # (chunk, first, stop)
        members: dict[int, int] = {}
        a = 0
        while a < n:
            c = ids[a][level]
            z = a + 1
            while z < n and ids[z][level] == c:
                z += 1
            if c != own:
                runs.append((c, a, z))
                members[c] = members.get(c, 0) | ((1 << z) - (1 << a))
            a = z
        for c, a, z in runs:
            bits = members[c]
            for t in range(a, z):
                masked[t] |= bits
    full = (1 << n) - 1
    return tuple(full & ~m for m in masked)


def work_entries(lengths: Sequence[int], allowed: Sequence[int], is_causal: bool) -> int:
    """Score entries of a node whose segments (of these lengths) may attend
    ``allowed`` (``allowed_masks``): its allowed pairs, on or below the
    diagonal if causal.

    A node's children split exactly its work between them, so this is 0 for a
    node iff nothing below it computes anything, and a child with as many
    entries as its parent holds all of the parent's work.
    """
    total = 0
    for s, mask in enumerate(allowed):
        rows = lengths[s]
        if is_causal:
            if mask >> s & 1:
                total += rows * (rows + 1) // 2
            mask &= (1 << s) - 1
        cols = 0
        t = 0
        while mask:
            if mask & 1:
                cols += lengths[t]
            mask >>= 1
            t += 1
        total += rows * cols
    return total


def cut_segments(
    segments: tuple[Segment, ...], chunks: tuple[tuple[int, int], ...]
) -> list[list[tuple[int, Segment]]]:
    """Cut a node's segments at chunk boundaries; add the chunk id to each piece.

    Per chunk, its pieces with the index of the segment each was cut from.
    """
    out: list[list[tuple[int, Segment]]] = [[] for _ in chunks]
    si = 0
    for c, (c0, clen) in enumerate(chunks):
        c1 = c0 + clen
        while si < len(segments) and clen:
            seg = segments[si]
            a = max(seg.local_start, c0)
            z = min(seg.local_stop, c1)
            if a < z:
                out[c].append(
                    (
                        si,
                        Segment(
                            start=seg.start + (a - seg.local_start),
                            length=z - a,
                            local_start=a,
                            chunks=seg.chunks + (c,),
                        ),
                    )
                )
            if seg.local_stop <= c1:
                si += 1
            else:
                break
    return out


def child_masks(
    allowed: tuple[int, ...], taken: list[tuple[int, int, Segment]], owner: int
) -> tuple[int, ...]:
    """``allowed_masks`` of a child from its parent's, given the child's pieces as
    (chunk, parent segment, piece): a piece may attend another iff their parent
    segments could and, at the new level, they are in different chunks or in
    the child's own one."""
    by_parent: dict[int, int] = {}
    by_chunk: dict[int, int] = {}
    for x, (c, p, _) in enumerate(taken):
        by_parent[p] = by_parent.get(p, 0) | 1 << x
        by_chunk[c] = by_chunk.get(c, 0) | 1 << x
    out = []
    for c, p, _ in taken:
        mask = allowed[p]
        bits = 0
        for q, qbits in by_parent.items():
            if mask >> q & 1:
                bits |= qbits
        if c != owner:
            bits &= ~by_chunk[c]
        out.append(bits)
    return tuple(out)


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
