"""The pipeline over an S3 object store against the same pipeline on local disk.

Starts moto's S3 server on loopback (``pip install 'moto[server]' s3fs``, in
the test requirements), creates the bench suite's store once on local disk
and once in a bucket, and times the forward pass on both, interleaved per
repeat so that load on the machine shifts both columns together. Reports
object store ÷ local disk per itr, and checks that both stores hold the same
bits. Writes bench/results/objectstore.md and objectstore.json.

moto is a Python stand-in for S3 on the same cores as the pipeline: each
request costs it milliseconds of this machine's CPU, where a real object
store's cost is network latency and bandwidth. The ratio measures the
library's requests (how many, how concurrent), not a real S3's throughput.

    python bench/objectstore.py                  # L=16384, H=4, D=64, fp32
    python bench/objectstore.py --seq-len 4096   # a minute
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import secrets
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--seq-len", type=int, default=16384)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--itr", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    a = ap.parse_args()
    try:
        import s3fs
        from moto.server import ThreadedMotoServer
    except ImportError:
        raise SystemExit("needs moto's server and s3fs: pip install 'moto[server]' s3fs") from None
    import zarr

    from streamcqsa.pipeline import run
    from streamcqsa.storage import create_random

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    so = {"key": "bench", "secret": "bench", "endpoint_url": f"http://{host}:{port}"}
    fs = s3fs.S3FileSystem(**so)
    bucket = f"scqsa-bench-{secrets.token_hex(4)}"
    fs.mkdir(bucket)
    tmp = Path(tempfile.mkdtemp(prefix="scqsa-objbench-"))
    shape = dict(seq_len=a.seq_len, heads=a.heads, head_dim=a.head_dim, dtype="float32")
    rows: list[dict] = []
    raw: dict[str, float] = {}
    t_all = time.perf_counter()
    try:
        for causal in (False, True):
            times: dict[tuple[str, int], list[float]] = {}
            for r in range(a.reps):
                for itr in a.itr:
                    for where in ("local", "s3"):
                        if where == "local":
                            path, opts = tmp / f"run-{r}-{itr}.zarr", None
                        else:
                            path, opts = f"s3://{bucket}/run-{causal}-{r}-{itr}.zarr", so
                        create_random(path, is_causal=causal, seed=0, storage_options=opts, **shape)
                        if opts is not None and "serve_s" not in raw:  # moto's own speed
                            keys = [k for n in ("q", "k", "v") for k in fs.find(f"{path[5:]}/{n}")]
                            t = time.perf_counter()
                            raw["bytes"] = sum(len(b) for b in fs.cat(keys).values())
                            raw["serve_s"] = time.perf_counter() - t
                        t = time.perf_counter()
                        run(path, itr=itr, progress=False, storage_options=opts)
                        times.setdefault((where, itr), []).append(time.perf_counter() - t)
                    g_local = zarr.open_group(tmp / f"run-{r}-{itr}.zarr", mode="r")
                    g_s3 = zarr.open_group(path, mode="r", storage_options=so)
                    same = all(np.array_equal(g_local[n][:], g_s3[n][:]) for n in ("out", "lse"))
                    if not same:
                        raise SystemExit(f"itr {itr}: the object store's bits differ from disk")
                    shutil.rmtree(tmp / f"run-{r}-{itr}.zarr")
                    fs.rm(path[5:], recursive=True)
            for itr in a.itr:
                loc = statistics.median(times[("local", itr)])
                obj = statistics.median(times[("s3", itr)])
                rows.append(
                    dict(
                        causal=causal,
                        itr=itr,
                        local_s=round(loc, 3),
                        s3_s=round(obj, 3),
                        ratio=round(obj / loc, 2),
                        bits_equal=True,
                    )
                )
                print(rows[-1], flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        server.stop()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = dict(
        vars(a),
        moto_inputs_mib=round(raw.get("bytes", 0) / 2**20, 1),
        moto_inputs_s=round(raw.get("serve_s", 0), 2),
        wall_s=round(time.perf_counter() - t_all, 1),
        machine=f"{platform.machine()}, {__import__('os').cpu_count()} CPUs",
        date=time.strftime("%Y-%m-%d"),
    )
    (out / "objectstore.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    lines = [
        "# The pipeline over an object store ÷ the pipeline on local disk",
        "",
        f"B=1, H={a.heads}, L={a.seq_len}, D={a.head_dim}, float32, library defaults, "
        f"median of {a.reps} interleaved runs; the store in a bucket of moto's S3 server on "
        "loopback (same machine), against a local directory. Both give the same bits. "
        "Regenerate: `python bench/objectstore.py`.",
        "",
        "| causal | itr | local s | S3 (moto) s | S3 ÷ local |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['causal']} | {r['itr']} | {r['local_s']} | {r['s3_s']} | {r['ratio']} |"
        )
    lines += [
        "",
        "moto answers each request in Python on these same cores: reading the "
        f"{meta['moto_inputs_mib']} MiB of inputs alone, all at once with nothing else "
        f"running, took it {meta['moto_inputs_s']} s here. So this ratio mostly counts "
        "moto's CPU against the pipeline's compute; a real object store adds network "
        "latency and bandwidth instead.",
    ]
    (out / "objectstore.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
