"""Tests for streamcqsa.cqs.interest (cyclic planar difference sets)."""

from __future__ import annotations

import math
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from streamcqsa.cqs import interest
from streamcqsa.cqs.interest import (
    chunk_count,
    interest_set,
    is_difference_set,
    is_prime_power,
    valid_quorums,
)

KNOWN = {
    2: (0, 1),
    3: (0, 1, 3),
    4: (0, 1, 3, 9),
    5: (0, 1, 4, 14, 16),
    6: (0, 1, 3, 8, 12, 18),
}

SMALL_VALID = [2, 3, 4, 5, 6, 8, 9, 10, 12, 14, 17, 18]
VALID_UP_TO_33 = [2, 3, 4, 5, 6, 8, 9, 10, 12, 14, 17, 18, 20, 24, 26, 28, 30, 32, 33]


def difference_counts(d: tuple[int, ...] | list[int], n: int) -> Counter[int]:
    """Independent oracle: how often each residue arises as d_a - d_b."""
    return Counter((a - b) % n for a in d for b in d if a != b)


def assert_planar(d: tuple[int, ...] | list[int], k: int) -> None:
    n = k * k - k + 1
    assert len(d) == k
    assert len(set(d)) == k
    assert all(isinstance(v, int) and 0 <= v < n for v in d)
    counts = difference_counts(d, n)
    assert set(counts) == set(range(1, n))
    assert all(c == 1 for c in counts.values())


# --- helpers ---------------------------------------------------------------


def test_chunk_count() -> None:
    assert [chunk_count(k) for k in range(2, 7)] == [3, 7, 13, 21, 31]
    with pytest.raises(ValueError):
        chunk_count(1)
    with pytest.raises(TypeError):
        chunk_count(True)


def test_is_prime_power() -> None:
    assert is_prime_power(2) == (2, 1)
    assert is_prime_power(32) == (2, 5)
    assert is_prime_power(27) == (3, 3)
    assert is_prime_power(25) == (5, 2)
    assert is_prime_power(31) == (31, 1)
    for x in (-4, 0, 1, 6, 10, 12, 15, 36):
        assert is_prime_power(x) is None


def test_valid_quorums() -> None:
    assert valid_quorums(33) == tuple(VALID_UP_TO_33)
    assert valid_quorums(1) == ()
    assert valid_quorums(2) == (2,)
    for k in (7, 11, 13, 15, 16, 19, 21, 22, 23, 27):
        assert k not in valid_quorums(40)


# --- known sets and the generator ------------------------------------------


@pytest.mark.parametrize("k", sorted(KNOWN))
def test_known_sets_are_difference_sets(k: int) -> None:
    n = chunk_count(k)
    assert is_difference_set(KNOWN[k], n)
    assert_planar(KNOWN[k], k)


@pytest.mark.parametrize("k", sorted(KNOWN))
def test_generated_matches_known_small_sets(k: int) -> None:
    # The canonical form is the lexicographically least equivalent set.
    assert interest_set(k) == KNOWN[k]


def test_is_difference_set_negative() -> None:
    assert not is_difference_set((0, 1, 2), 7)
    assert not is_difference_set((0, 1, 3, 3), 13)
    assert not is_difference_set((0, 1, 3, 13), 13)
    assert not is_difference_set((0, 1, 3), 8)
    assert is_difference_set((1, 2, 4), 7)


@settings(max_examples=30, deadline=None)
@given(st.sampled_from(SMALL_VALID))
def test_generated_set_is_planar(k: int) -> None:
    d = interest_set(k)
    assert isinstance(d, tuple)
    assert 0 in d
    assert list(d) == sorted(d)
    assert_planar(d, k)


@pytest.mark.parametrize("k", VALID_UP_TO_33)
def test_each_valid_k_is_built_not_searched(monkeypatch, k: int) -> None:
    """From a cold cache, one Singer set is built and verified: one candidate
    checked (no search over candidates), a bounded number of polynomial
    products (the field arithmetic is polynomial in k)."""
    calls: Counter[str] = Counter()
    for name in ("_mulmod", "_difference_defect"):
        original = getattr(interest, name)

        def counted(*args, _name=name, _original=original):  # noqa: ANN002, ANN202
            calls[_name] += 1
            return _original(*args)

        monkeypatch.setattr(interest, name, counted)
    interest._clear_caches()
    interest_set.cache_clear()
    d = interest_set(k)
    assert calls["_difference_defect"] == 1
    assert calls["_mulmod"] <= 4096
    assert_planar(d, k)


def test_result_is_cached_and_deterministic() -> None:
    interest_set.cache_clear()
    first = interest_set(17)
    assert interest_set(17) is first
    interest_set.cache_clear()
    assert interest_set(17) == first


# --- invalid k ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("k", "nearest"),
    [
        (7, "6 or 8"),
        (11, "10 or 12"),
        (13, "12 or 14"),
        (16, "17"),
        (1, "2"),
        (0, "2"),
        (-3, "2"),
    ],
)
def test_invalid_k_names_nearest(k: int, nearest: str) -> None:
    with pytest.raises(ValueError) as info:
        interest_set(k)
    assert nearest in str(info.value)


def test_invalid_k_message_format() -> None:
    with pytest.raises(ValueError, match=r"k-1=6 is not a prime power.*6 or 8"):
        interest_set(7)


@pytest.mark.parametrize("k", [True, False, 3.0, "3", None])
def test_non_integer_k_is_type_error(k: object) -> None:
    with pytest.raises(TypeError):
        interest_set(k)  # type: ignore[arg-type]


# --- candidates ----------------------------------------------------------------


def test_candidate_valid_shifted_is_normalised() -> None:
    # {0,1,3,9} + 2 mod 13 = {2,3,5,11}: no 0, so it is shifted back.
    assert interest_set(4, candidate=[11, 2, 5, 3]) == (0, 1, 3, 9)
    # Already contains 0: only sorted.
    assert interest_set(3, candidate=[6, 0, 4]) == (0, 4, 6)
    assert interest_set(4, candidate=(0, 1, 3, 9)) == (0, 1, 3, 9)


@pytest.mark.parametrize(
    ("k", "cand", "pattern"),
    [
        (4, [0, 1, 2, 3], r"residue 1 is covered 3 times"),
        (3, [0, 1, 2], r"residue 1 is covered 2 times"),
        (4, [0, 1, 3], r"3 elements, expected k=4"),
        (4, [0, 1, 3, 9, 10], r"5 elements"),
        (4, [0, 1, 3, 13], r"outside \[0, 13\)"),
        (4, [0, 1, 3, -1], r"outside"),
        (4, [0, 1, 1, 9], r"more than once"),
        (4, [0, 1, 3, 9.0], r"not an integer"),
        (4, [0, True, 3, 9], r"bool"),
        (5, [0, 1, 3, 7, 12], r"residue \d+ is covered"),
    ],
)
def test_candidate_rejected(k: int, cand: list[object], pattern: str) -> None:
    with pytest.raises(ValueError, match=pattern):
        interest_set(k, candidate=cand)  # type: ignore[arg-type]


def test_candidate_reports_uncovered_residue() -> None:
    # mod 7 the set {0, 1, 5} has differences 1, 5, 4 and their negatives
    # 6, 2, 3 -- all covered; {0, 2, 4} misses residue 1.
    with pytest.raises(ValueError, match=r"residue 1 is covered 0 times"):
        interest_set(3, candidate=[0, 2, 4])


@settings(max_examples=60, deadline=None)
@given(st.sampled_from(SMALL_VALID), st.data())
def test_shifted_multiplied_candidate_accepted(k: int, data: st.DataObject) -> None:
    n = chunk_count(k)
    base = interest_set(k)
    shift = data.draw(st.integers(0, n - 1), label="shift")
    mult = data.draw(st.integers(1, n - 1).filter(lambda t: math.gcd(t, n) == 1), label="mult")
    cand = [(mult * v + shift) % n for v in base]
    got = interest_set(k, candidate=cand)
    assert 0 in got
    assert list(got) == sorted(got)
    assert_planar(got, k)
    # Normalisation is a pure translation of the supplied set.
    offset = 0 if 0 in cand else min(cand)
    assert sorted((v - offset) % n for v in cand) == list(got)
