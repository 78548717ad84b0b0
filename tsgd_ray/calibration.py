"""Measured throughputs the plan turns into wall time: the calibration table.

The table (`calibration.json` beside this module, written by `benchmarks/calibrate.py` and by
`benchmarks/gpu.py` on a GPU) holds rows of four kinds:

    compute   {device, work, model, width, depth, clip, rate}   one worker: clips/s of `work`
              (train: forward + backward + optimiser step; forward; recovery: video-iterations/s);
              on the cpu device, per thread (a worker with c CPUs runs c threads)
    feed      {work, clip, rate}   clips/s per CPU core: `decode` (a video's clip from its shard)
              or `read` (decoded clips from the clip cache, gathered into batches)
    start     {work, seconds}      a stage's fixed cost (`work`: teacher, stats, distill or
              evaluate): starting its workers, checkpoints, tracking, beside the clips
    prepare   {short_side, rate}   videos/s per CPU core of prepare (probe + transcode to that side)

Every row names its `source` (the command and machine). A lookup that finds no row returns None
(the plan falls back to FLOPs at the assumed throughput, and says so); feed rows of another clip
size are scaled by the clip's bytes.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Optional, Sequence

TABLE = Path(__file__).with_name("calibration.json")


def load(path: Optional[Path] = None) -> list[dict]:
    """The rows of the table at `path` (default: the shipped one); [] when there is none."""
    p = Path(path) if path else TABLE
    return json.loads(p.read_text())["rows"] if p.is_file() else []


def save(rows: Sequence[dict], path: Optional[Path] = None) -> None:
    """Merge `rows` into the table at `path`: a row replaces the one with the same key (all fields
    but rate, seconds and source)."""
    p = Path(path) if path else TABLE
    table = {_key(r): r for r in load(p)}
    table.update({_key(r): dict(r) for r in rows})
    ordered = sorted(table.values(), key=lambda r: json.dumps(_key_fields(r), sort_keys=True))
    p.write_text('{"rows": [\n' + ",\n".join(json.dumps(r) for r in ordered) + "\n]}\n")  # a row a line


def _key_fields(row: dict) -> dict:
    return {k: v for k, v in row.items() if k not in ("rate", "seconds", "source")}


def _key(row: dict) -> str:
    return json.dumps(_key_fields(row), sort_keys=True)


def compute(
    rows: Sequence[dict], device: str, work: str, model: str, width: int, depth: int, clip: Sequence[int]
) -> Optional[dict]:
    """The compute row of (device, work, model, width, depth, clip), or None."""
    want = {"kind": "compute", "device": device, "work": work, "model": model, "width": width, "depth": depth}
    for r in rows:
        if all(r.get(k) == v for k, v in want.items()) and list(r["clip"]) == list(clip):
            return r
    return None


def feed(rows: Sequence[dict], work: str, clip: Sequence[int]) -> Optional[tuple[float, str]]:
    """(clips/s per CPU core of `work` (decode or read) at `clip` (F, H, W), "measured"): the row of
    that clip, else the nearest row's rate scaled by the ratio of clip bytes ("scaled from F x H x W");
    None without a row."""
    found = [r for r in rows if r["kind"] == "feed" and r["work"] == work]
    if not found:
        return None
    size = math.prod(clip)
    best = min(found, key=lambda r: abs(math.log(math.prod(r["clip"]) / size)))
    if list(best["clip"]) == list(clip):
        return best["rate"], "measured"
    return best["rate"] * math.prod(best["clip"]) / size, "scaled from " + "x".join(map(str, best["clip"]))


def start(rows: Sequence[dict], work: str) -> float:
    """The fixed seconds of stage `work` (teacher, stats, distill, evaluate); 0 without a row."""
    return next((r["seconds"] for r in rows if r["kind"] == "start" and r["work"] == work), 0.0)


def prepare(rows: Sequence[dict], short_side: int) -> Optional[float]:
    """Videos/s per CPU core of prepare transcoding to `short_side`, or None."""
    return next((r["rate"] for r in rows if r["kind"] == "prepare" and r["short_side"] == short_side), None)
