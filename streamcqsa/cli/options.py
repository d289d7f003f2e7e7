"""The command line's argument types and the option groups several commands share."""

from __future__ import annotations

import argparse
import math


def _quorum(text: str) -> int | list[int]:
    parts = [int(x) for x in text.split(",") if x.strip()]
    if not parts:
        raise argparse.ArgumentTypeError("quorum needs at least one int")
    return parts[0] if len(parts) == 1 else parts


def _itr(text: str) -> int | str:
    return "auto" if text == "auto" else _count(text, 0)


def _count(text: str, minimum: int = 1) -> int:
    """An int, also written as a whole number in exponent form (``1e9``)."""
    try:
        v = int(text)
    except ValueError:
        try:
            f = float(text)
        except ValueError:
            f = float("nan")
        if not (f.is_integer() and abs(f) < 2**63):
            raise argparse.ArgumentTypeError(f"expected an int, got {text!r}") from None
        v = int(f)
    if v < minimum:
        raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {v}")
    return v


def _positive(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(v) or v <= 0:
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return v


def _unit_depth(text: str) -> int | str | None:
    if text in ("auto", "leaves"):
        return "auto" if text == "auto" else None
    return _count(text, 0)


def _add_unit_depth(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--unit-depth",
        type=_unit_depth,
        default="auto",
        help="resumable units: 'auto' (shallowest that fits host memory), 'leaves' "
        "(store every leaf partial), or a depth",
    )


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def _device_args(a: argparse.Namespace) -> dict:
    return {
        "device": a.device,
        "device_memory": a.device_memory,
        "task_bytes": a.task_bytes,
        "n_cap": a.n_cap,
        "keep_partials": a.keep_partials,
    }


def _add_device_args(s: argparse.ArgumentParser) -> None:
    s.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda[:N]")
    s.add_argument(
        "--device-memory",
        type=_bytes,
        default=None,
        help="device memory the units may use, e.g. 40GiB (default: what the device has)",
    )
    s.add_argument(
        "--task-bytes",
        type=_bytes,
        default=None,
        help="memory one unit may take (default: 1/16 of the host's memory, 256MiB to "
        "4GiB; on a GPU 40%% of its memory); larger units read and fold less",
    )
    s.add_argument("--n-cap", type=_count, default=None, help="units resident per device")
    s.add_argument(
        "--keep-partials",
        action="store_true",
        help="also store every unit's partial, to inspect (k^unit-depth times more disk)",
    )


def _bytes(text: str) -> int:
    units = {"k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}
    t = text.strip().lower().removesuffix("b").removesuffix("i")
    scale = units.get(t[-1:], 1)
    try:
        n = float(t[:-1] if scale > 1 else t) * scale
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a size like 80GiB, got {text!r}") from None
    if not math.isfinite(n) or n < 1:
        raise argparse.ArgumentTypeError(f"must be a size >= 1 byte, got {text!r}")
    return int(n)


def _storage_option(text: str) -> tuple[str, object]:
    """KEY=VALUE; VALUE is a string, except true/false/null and JSON objects and
    lists (a numeric secret stays a string)."""
    import json

    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    if value in ("true", "false", "null") or value.startswith(("{", "[")):
        try:
            return key, json.loads(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{key}: {value!r} is not valid JSON") from None
    return key, value


def _add_store(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "path", help="the run store: a directory, or a URL such as s3://bucket/prefix/run.zarr"
    )
    parser.add_argument(
        "--storage-option",
        dest="storage_options",
        metavar="KEY=VALUE",
        type=_storage_option,
        action="append",
        help="an fsspec storage option for a URL store, as zarr's storage_options "
        "(repeatable; e.g. endpoint_url=http://host:9000 or anon=true; values are "
        "strings but for true, false, null and JSON {...} or [...])",
    )


DTYPES = ("float32", "float16", "bfloat16")


def _add_problem(
    s: argparse.ArgumentParser, *, seq_len: int | None, heads: int = 8, kv_heads: int | None = None
) -> None:
    """The attention problem's shape, as [B, H, L, D] with GQA kv heads; the
    dtype and causal flags differ per command and are added there."""
    if seq_len is None:
        s.add_argument("--seq-len", type=_count, required=True, help="tokens L (1e9 works)")
    else:
        s.add_argument("--seq-len", type=_count, default=seq_len, help="tokens L (1e9 works)")
    s.add_argument("--heads", type=_count, default=heads, help="query heads H")
    s.add_argument(
        "--kv-heads",
        type=_count,
        default=kv_heads,
        help="key/value heads, dividing --heads (GQA; default: "
        + ("--heads)" if kv_heads is None else f"{kv_heads})"),
    )
    s.add_argument("--head-dim", type=_count, default=64, help="head dimension D")
    s.add_argument("--batch", type=_count, default=1, help="batch size B")


def _add_budgets(s: argparse.ArgumentParser) -> None:
    """The memory a plan is sized for (on the machine that will run it)."""
    s.add_argument(
        "--device-memory", type=_bytes, default="80GiB", help="memory per device, e.g. 80GiB"
    )
    s.add_argument(
        "--host-memory", type=_bytes, default="64GiB", help="host memory for staging and units"
    )
    s.add_argument("--quorum", type=int, default=3, help="quorum size k of each level")


OVERLAP_IO = {"auto": None, "on": True, "off": False}


def _add_overlap_io(s: argparse.ArgumentParser) -> None:
    s.add_argument(
        "--overlap-io",
        choices=tuple(OVERLAP_IO),
        default="auto",
        help="units read ahead and write back on threads of their own: 'auto' on a GPU "
        "or with a spare core, 'on' for slow storage",
    )
