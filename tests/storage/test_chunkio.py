"""The store's own chunk I/O (``storage.chunkio``) agrees byte for byte with zarr."""

from __future__ import annotations

import os
import stat

import numpy as np
import pytest
import zarr

from streamcqsa.storage import chunkio
from streamcqsa.storage.store import array_kwargs


@pytest.mark.parametrize("dtype", ["float32", "uint16"])
@pytest.mark.parametrize("chunks", [(1, 1, 64, 8), (1, 3, 64, 8)])
def test_direct_writes_equal_zarr_writes(tmp_path, dtype, chunks):
    """Whole chunks go from the caller's memory straight to files (edge chunks
    through a staging buffer): the files equal zarr's, zarr reads them back
    with their checksums, and no temp file is left."""
    shape = (2, 3, 200, 8)  # 200 rows: three whole chunks and an edge chunk
    rng = np.random.default_rng(0)
    data = (rng.standard_normal((2, 6, 200, 8)) * 1000).astype(dtype)[:, ::2]  # strided heads
    mine = zarr.open_group(tmp_path / "mine", mode="w").create_array(
        "x", shape=shape, **array_kwargs(dtype, chunks)
    )
    ref = zarr.open_group(tmp_path / "ref", mode="w").create_array(
        "x", shape=shape, **array_kwargs(dtype, chunks)
    )
    assert chunkio.fast_path(mine)
    chunkio.write(mine, (slice(0, 2), slice(0, 3), slice(0, 200)), data)
    ref[:] = data
    files = sorted(p.relative_to(tmp_path / "mine") for p in (tmp_path / "mine").rglob("c/**/*"))
    files = [f for f in files if (tmp_path / "mine" / f).is_file()]
    assert files and not [f for f in files if f.name.endswith(".partial")]
    for f in files:
        assert (tmp_path / "mine" / f).read_bytes() == (tmp_path / "ref" / f).read_bytes(), f
        m1 = stat.S_IMODE(os.stat(tmp_path / "mine" / f).st_mode)
        m2 = stat.S_IMODE(os.stat(tmp_path / "ref" / f).st_mode)
        assert m1 == m2
    assert np.array_equal(np.asarray(zarr.open_array(tmp_path / "mine" / "x")[:]), data)
    got = chunkio.read(mine, (slice(0, 2), slice(0, 3), slice(0, 200)))
    assert np.array_equal(got, data)


def test_local_jobs_all_end_before_the_first_failure_is_raised():
    """Local chunk reads fill the caller's buffer: every job has ended when
    the call returns or raises, and the failure raised is the first in job
    order, whichever thread failed first."""
    import threading
    import time

    ended = []
    lock = threading.Lock()

    def job(i: int) -> int:
        time.sleep(0.02 if i in (0, 5) else 0.0)
        with lock:
            ended.append(i)
        if i in (3, 5):
            raise ValueError(f"job {i}")
        return i * i

    assert chunkio._each(job, [(i,) for i in range(3)]) == [0, 1, 4]
    ended.clear()
    with pytest.raises(ValueError, match="job 3"):
        chunkio._each(job, [(i,) for i in range(8)])
    assert sorted(ended) == list(range(8))


def test_a_corrupt_chunk_among_many_local_reads_is_named(tmp_path):
    """Many chunks read at once: good ones land, and a damaged one is named."""
    from streamcqsa.errors import StoreError

    shape, chunks = (1, 2, 512, 8), (1, 1, 64, 8)
    arr = zarr.open_group(tmp_path, mode="w").create_array(
        "x", shape=shape, **array_kwargs("float32", chunks)
    )
    data = np.random.default_rng(1).standard_normal(shape).astype("float32")
    chunkio.write(arr, (slice(0, 1), slice(0, 2), slice(0, 512)), data)
    out = np.empty(shape, dtype="float32")
    assert np.array_equal(chunkio.read(arr, (slice(0, 1), slice(0, 2), slice(0, 512)), out), data)
    f = tmp_path / "x" / "c" / "0" / "1" / "5" / "0"
    raw = bytearray(f.read_bytes())
    raw[7] ^= 1
    f.write_bytes(bytes(raw))
    with pytest.raises(StoreError, match=r"\(0, 1, 5, 0\)"):
        chunkio.read(arr, (slice(0, 1), slice(0, 2), slice(0, 512)), out)
