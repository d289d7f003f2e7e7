"""Interest sets for cyclic quorum sets (planar cyclic difference sets).

A cyclic quorum system of quorum size ``k`` splits the work into
``n = k*k - k + 1`` chunks. Subsequence ``i`` is interested in the chunks
``(i + d) mod n`` for ``d`` in its *interest set* ``D``. Any two subsequences
then share exactly one chunk if and only if ``D`` is a cyclic
``(n, k, 1)`` difference set: every non-zero residue mod ``n`` is
``d_a - d_b`` for exactly one ordered pair ``(a, b)``.

Such sets are known to exist when ``k - 1`` is a prime power (Singer's
construction, implemented below). For every other ``k`` none is known: the
cases ``k - 1 = 6`` and ``k - 1 = 10`` are proved impossible, and the prime
power conjecture says no other ``k`` works either. We therefore refuse such
``k`` and point at the nearest valid quorum sizes, unless the caller supplies
a candidate set, which we then check on its own merits.
"""

from __future__ import annotations

import functools
import math
import operator
from collections.abc import Sequence

import numpy as np

__all__ = [
    "chunk_count",
    "interest_set",
    "is_difference_set",
    "is_prime_power",
    "valid_quorums",
]


# ---------------------------------------------------------------------------
# Small integer helpers
# ---------------------------------------------------------------------------


def _as_int(value: object, what: str) -> int:
    """Return ``value`` as a plain int, refusing bools and non-integers.

    ``bool`` is an ``int`` subclass, but ``True`` as a quorum size is almost
    certainly a bug, so it is rejected together with floats and strings.
    Integer-like objects (e.g. numpy integers) are accepted via ``__index__``.
    """
    if isinstance(value, bool):
        raise TypeError(f"{what} must be an integer, not bool")
    try:
        return operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        raise TypeError(f"{what} must be an integer, not {type(value).__name__}") from None


def _prime_factors(x: int) -> list[int]:
    """Distinct prime factors of ``x >= 1`` in increasing order (trial division)."""
    factors: list[int] = []
    r = 2
    while r * r <= x:
        if x % r == 0:
            factors.append(r)
            while x % r == 0:
                x //= r
        r += 1 if r == 2 else 2
    if x > 1:
        factors.append(x)
    return factors


def is_prime_power(x: int) -> tuple[int, int] | None:
    """Return ``(p, m)`` with ``x == p**m``, ``p`` prime, ``m >= 1``; else ``None``.

    Quorum size ``k`` is constructible exactly when ``k - 1`` is a prime
    power, because Singer's construction needs the field ``GF(k - 1)``.
    """
    x = _as_int(x, "x")
    if x < 2:
        return None
    factors = _prime_factors(x)
    if len(factors) != 1:
        return None
    p = factors[0]
    m = 0
    while x > 1:
        x //= p
        m += 1
    return p, m


def _is_valid_quorum(k: int) -> bool:
    # k = 2 (q = 1) is the degenerate plane {0, 1} mod 3; it is valid too.
    return k == 2 or (k > 2 and is_prime_power(k - 1) is not None)


def chunk_count(k: int) -> int:
    """Number of chunks ``n = k*k - k + 1`` for quorum size ``k``.

    With ``n`` chunks and ``k`` chunks per subsequence, every ordered pair of
    distinct interest elements must produce a distinct non-zero difference,
    so ``k * (k - 1) == n - 1``.
    """
    k = _as_int(k, "quorum size k")
    if k < 2:
        raise ValueError(f"quorum size must be at least 2, got {k}")
    return k * k - k + 1


def valid_quorums(upper: int) -> tuple[int, ...]:
    """All quorum sizes ``k`` in ``[2, upper]`` for which a set can be built."""
    upper = _as_int(upper, "upper")
    return tuple(k for k in range(2, upper + 1) if _is_valid_quorum(k))


def _nearest_valid(k: int) -> tuple[int, ...]:
    """Valid quorum sizes closest to ``k`` (two of them when tied)."""
    if k <= 2:
        return (2,)
    dist = 0
    while True:
        found = tuple(c for c in sorted({k - dist, k + dist}) if _is_valid_quorum(c))
        if found:
            return found
        dist += 1


# ---------------------------------------------------------------------------
# Difference set checking
# ---------------------------------------------------------------------------


def _difference_defect(d: Sequence[int], n: int) -> str | None:
    """Describe why ``d`` is not a planar difference set mod ``n`` (None if it is).

    A single routine serves both the boolean predicate and the error messages,
    so that the two can never disagree.
    """
    if n < 1:
        return f"modulus must be positive, got {n}"
    values: list[int] = []
    for pos, item in enumerate(d):
        if isinstance(item, bool):
            return f"element {pos} is a bool, not an integer"
        try:
            values.append(operator.index(item))
        except TypeError:
            return f"element {pos} ({item!r}) is not an integer"
    for v in values:
        if not 0 <= v < n:
            return f"element {v} is outside [0, {n})"
    if len(set(values)) != len(values):
        dup = next(v for v in values if values.count(v) > 1)
        return f"element {dup} occurs more than once"
    owners: list[list[tuple[int, int]]] = [[] for _ in range(n)]
    for a in values:
        for b in values:
            if a != b:
                owners[(a - b) % n].append((a, b))
    for residue in range(1, n):
        pairs = owners[residue]
        if not pairs:
            return f"residue {residue} is covered 0 times (no d_a - d_b equals it)"
        if len(pairs) > 1:
            shown = ", ".join(f"{a}-{b}" for a, b in pairs[:3])
            return f"residue {residue} is covered {len(pairs)} times ({shown})"
    return None


def is_difference_set(d: Sequence[int], n: int) -> bool:
    """True iff ``d`` is a cyclic ``(n, len(d), 1)`` difference set.

    That is: distinct integers in ``[0, n)`` whose pairwise differences hit
    every non-zero residue mod ``n`` exactly once -- exactly the property that
    makes any two cyclic shifts of ``d`` intersect in one element.
    """
    n = _as_int(n, "n")
    return _difference_defect(d, n) is None


# ---------------------------------------------------------------------------
# Polynomial arithmetic over GF(p)
#
# A polynomial of degree < d is a list of d coefficients, lowest first. The
# monic modulus x^d + f[d-1] x^(d-1) + ... + f[0] is stored as ``f`` (its d
# low coefficients).
# ---------------------------------------------------------------------------


def _mulmod(a: list[int], b: list[int], f: list[int], p: int) -> list[int]:
    d = len(f)
    prod = [0] * (2 * d - 1)
    for i, ai in enumerate(a):
        if ai:
            for j, bj in enumerate(b):
                prod[i + j] += ai * bj
    for top in range(2 * d - 2, d - 1, -1):
        c = prod[top] % p
        if c:
            base = top - d
            for j, fj in enumerate(f):
                prod[base + j] -= c * fj
    return [c % p for c in prod[:d]]


def _powmod(a: list[int], e: int, f: list[int], p: int) -> list[int]:
    result = [1] + [0] * (len(f) - 1)
    while e:
        if e & 1:
            result = _mulmod(result, a, f, p)
        e >>= 1
        if e:
            a = _mulmod(a, a, f, p)
    return result


def _x(d: int) -> list[int]:
    return [0, 1] + [0] * (d - 2) if d >= 2 else [0]


@functools.cache
def _primitive_polynomial(p: int, d: int) -> tuple[int, ...]:
    """First primitive monic polynomial of degree ``d >= 2`` over GF(p).

    Candidates are tried in a fixed order for determinism. We only test that
    ``x`` has multiplicative order exactly ``p**d - 1`` modulo ``f``: that
    makes the unit group of GF(p)[x]/(f) as large as the ring minus zero, so
    the ring is a field and ``f`` is irreducible (hence primitive) as well.
    """
    order = p**d - 1
    cofactors = [order // r for r in _prime_factors(order)]
    one = [1] + [0] * (d - 1)
    x = _x(d)
    for code in range(p**d):
        f = [(code // p**j) % p for j in range(d)]
        if f[0] == 0:
            continue  # divisible by x
        # Cheap filter: a root a in GF(p) means a linear factor.
        if any(
            (pow(a, d, p) + sum(c * pow(a, j, p) for j, c in enumerate(f))) % p == 0
            for a in range(1, p)
        ):
            continue
        if _powmod(x, order, f, p) != one:
            continue
        if all(_powmod(x, e, f, p) != one for e in cofactors):
            return tuple(f)
    raise RuntimeError(f"no primitive polynomial of degree {d} over GF({p})")


def _singer_raw(q: int, p: int, m: int) -> list[int]:
    """Singer difference set ``{i in [0, n) : Tr(alpha^i) = 0}``.

    ``alpha = x`` generates GF(q^3)^*, ``Tr(y) = y + y^q + y^(q^2)`` is the
    trace to GF(q). Its kernel is a 2-dimensional GF(q)-subspace, i.e. a line
    of the projective plane PG(2, q); the powers of alpha mod n act on the
    points transitively, which is what makes the set a difference set.
    """
    n = q * q + q + 1
    d = 3 * m
    f = list(_primitive_polynomial(p, d))
    # Tr is GF(p)-linear, so tabulate t_j = Tr(x^j) once; then Tr(v) = v @ T.
    x = _x(d)
    xq = _powmod(x, q, f, p)  # Frobenius image of x
    xq2 = _powmod(xq, q, f, p)
    trace_rows: list[list[int]] = []
    a = [1] + [0] * (d - 1)
    b = list(a)
    c = list(a)
    for _ in range(d):
        trace_rows.append([(u + v + w) % p for u, v, w in zip(a, b, c, strict=False)])
        a = _mulmod(a, x, f, p)
        b = _mulmod(b, xq, f, p)
        c = _mulmod(c, xq2, f, p)
    # Coordinates of alpha^0 .. alpha^(n-1): multiplying by x is a shift
    # followed by one reduction step.
    powers = np.empty((n, d), dtype=np.int64)
    v = [1] + [0] * (d - 1)
    for i in range(n):
        powers[i] = v
        carry = v[-1]
        v = [0, *v[:-1]]
        if carry:
            v = [(vi - carry * fj) % p for vi, fj in zip(v, f, strict=False)]
    traces = (powers @ np.array(trace_rows, dtype=np.int64)) % p
    return [int(i) for i in np.flatnonzero(~traces.any(axis=1))]


def _canonical(d: Sequence[int], n: int) -> tuple[int, ...]:
    """Lexicographically smallest set equivalent to ``d`` under shifts and
    multipliers coprime with ``n``.

    Singer sets built from different primitive polynomials differ only by
    such maps, so this makes the result independent of implementation
    details. Because difference 1 occurs exactly once, it is the smallest
    cyclic gap, and the lexicographically least shift of any image starts at
    the element just before that gap.
    """
    best: tuple[int, ...] | None = None
    for t in range(1, n):
        if math.gcd(t, n) != 1:
            continue
        s = sorted(t * v % n for v in d)
        k = len(s)
        j = next(i for i in range(k) if (s[(i + 1) % k] - s[i]) % n == 1)
        start = s[j]
        cand = tuple((v - start) % n for v in s[j:] + s[:j])
        if best is None or cand < best:
            best = cand
    assert best is not None
    return best


@functools.cache
def _singer_set(k: int) -> tuple[int, ...]:
    """Canonical verified interest set for a valid quorum size ``k``."""
    n = chunk_count(k)
    if k == 2:
        raw = [0, 1]  # q = 1 is no prime power, but {0, 1} mod 3 works
    else:
        pm = is_prime_power(k - 1)
        assert pm is not None
        raw = _singer_raw(k - 1, *pm)
    result = _canonical(raw, n)
    defect = _difference_defect(result, n)
    if len(result) != k or defect is not None:
        raise RuntimeError(f"internal error building interest set for k={k}: {defect}")
    return result


def _clear_caches() -> None:
    """Forget all cached sets and polynomials (used e.g. for timing)."""
    _singer_set.cache_clear()
    _primitive_polynomial.cache_clear()


# ---------------------------------------------------------------------------
# Public entry point
# ---------------------------------------------------------------------------


def interest_set(k: int, *, candidate: Sequence[int] | None = None) -> tuple[int, ...]:
    """Interest set ``D`` (sorted, contains 0) for quorum size ``k``.

    Without ``candidate`` a Singer difference set is built (cached), put in a
    canonical form so it is deterministic, and verified before returning.
    ``0 in D`` keeps the convention that subsequence ``i`` owns chunk ``i``.

    With ``candidate`` the caller's set is verified instead (``k - 1`` need
    not be a prime power then: the set speaks for itself) and returned
    sorted; if it lacks 0 it is shifted by its smallest element, which
    preserves the difference property.

    Raises ``TypeError`` if ``k`` is not an integer (bools included) and
    ``ValueError`` if ``k < 2``, ``k - 1`` is not a prime power (the message
    names the nearest valid sizes), or the candidate is not a valid set.
    """
    k = _as_int(k, "quorum size k")
    if k < 2:
        raise ValueError(f"quorum size must be at least 2, got {k}; nearest valid quorum size: 2")
    n = chunk_count(k)
    if candidate is not None:
        cand = list(candidate)
        if len(cand) != k:
            raise ValueError(f"candidate has {len(cand)} elements, expected k={k} (n={n})")
        defect = _difference_defect(cand, n)
        if defect is not None:
            raise ValueError(f"candidate is not a ({n}, {k}, 1) difference set: {defect}")
        values = sorted(operator.index(v) for v in cand)
        if values[0] != 0:
            shift = values[0]
            values = [v - shift for v in values]
        return tuple(values)
    if not _is_valid_quorum(k):
        near = _nearest_valid(k)
        noun = "size" if len(near) == 1 else "sizes"
        raise ValueError(
            f"quorum {k} has no cyclic difference set (k-1={k - 1} is not a "
            f"prime power); nearest valid quorum {noun}: " + " or ".join(str(c) for c in near)
        )
    return _singer_set(k)


# Expose a way to start from a cold cache, mirroring functools' API.
interest_set.cache_clear = _clear_caches  # type: ignore[attr-defined]
