"""What a pass reports: ``RunStats``, and the disk it needs before it starts.

``RunStats`` is frozen; it also reads as a mapping (``stats["units_run"]``,
``dict(stats)``), which is how scripts and the store's metadata keep it.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from streamcqsa.cqs.footprint import peak_disk
from streamcqsa.storage.layout import stored_dtype
from streamcqsa.storage.runarrays import RunArrays
from streamcqsa.storage.units import partial_names


@dataclass(frozen=True)
class RunStats(Mapping):
    """Statistics of one pass. ``disk`` has the bytes the pass needs at its
    peak: ``outputs_bytes``, ``accumulator_bytes``, ``kept_bytes`` and
    ``dout_bytes``, their sum ``peak_bytes``, and ``more_bytes`` (the part
    not already on disk when the pass started)."""

    kind: str  # "fwd" or "bwd" (``stats["pass"]``)
    plan: dict
    units_run: int
    units_skipped: int
    units: int  # the units ``status`` counts (progress markers)
    restarted: bool  # earlier work of this pass was discarded
    orphans_removed: int
    partial_disk_bytes: int  # accumulator and kept partials at their peak
    disk: dict
    keep_partials: bool
    seconds: float
    work_entries: int
    guardrail: dict
    stages: dict
    dout: str | None = None  # backward: "new", "same" (given again) or "stored"
    _extra: dict = field(default_factory=dict, repr=False, compare=False)

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("_extra")
        d["pass"] = d.pop("kind")
        if d["dout"] is None:
            d.pop("dout")
        return d

    def __getitem__(self, key: str) -> Any:
        return self.to_dict()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.to_dict())

    def __len__(self) -> int:
        return len(self.to_dict())


def _output_bytes(arrays: RunArrays) -> int:
    lay = arrays.layout
    p = lay.problem
    rows = lay.chunks * lay.chunk
    item = 2 if stored_dtype(p.dtype) in ("float16", "uint16") else 4
    total = 0
    for name in partial_names(arrays.kind):
        heads = p.kv_heads if name in ("dk", "dv") else p.heads
        width = 4 if name == "lse" else p.head_dim * item
        total += p.batch * heads * rows * width + p.batch * heads * lay.chunks * 4  # + crc
    return total


def disk_needs(
    arrays: RunArrays,
    keep_partials: bool,
    new_dout: bool,
    in_flight: int,
    location: Any = None,
) -> dict:
    """The disk a pass needs at its peak (``cqs.footprint.peak_disk``), with
    ``in_flight`` finals running at once."""
    lay, kind = arrays.layout, arrays.kind
    p = lay.problem
    outputs = _output_bytes(arrays)
    out = {
        "outputs_bytes": outputs,
        "accumulator_bytes": lay.accumulator_bytes(kind),
        "kept_bytes": lay.kept_partial_bytes(kind) if keep_partials else 0,
        "dout_bytes": 0,
    }
    if new_dout:
        item = 2 if stored_dtype(p.dtype) in ("float16", "uint16") else 4
        out["dout_bytes"] = p.batch * p.heads * lay.chunks * lay.chunk * p.head_dim * item
    finals = p.batch * lay.groups * lay.chunks  # also the accumulator's chunks
    per_final = -(-outputs // finals) if finals else 0
    per_acc = -(-out["accumulator_bytes"] // finals) if finals else 0
    # a fold piece rewrites up to a shard's chunks at once; ``in_flight`` run at once
    writers = max(1, in_flight) * (lay.fold.shard_chunks if out["accumulator_bytes"] else 1)
    out["rewrite_bytes"] = per_acc * writers if out["accumulator_bytes"] else 0
    out["peak_bytes"] = (
        out["dout_bytes"]
        + out["kept_bytes"]
        + peak_disk(
            outputs,
            out["accumulator_bytes"],
            per_final * max(1, in_flight),
            per_acc * writers,
        )
    )
    have = 0
    if location is not None and location.named:
        names = [*partial_names(kind), f"partials/{kind}"] + (["dout"] if new_dout else [])
        have = sum(location.size(n) for n in names)
    out["more_bytes"] = max(0, out["peak_bytes"] - have)
    return out


__all__ = ["RunStats", "disk_needs"]
