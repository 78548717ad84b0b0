"""Choosing real clips per class: recovery init and the coreset baselines.

Every function returns, per class, the positions (rows of the given real set) of `ipc` clips,
ordered; a class's choice depends only on its own clips and (seed, class), never on the others.

Raises TooFewClips when a class has fewer than `ipc` clips.
"""

from __future__ import annotations

import hashlib
import math
from typing import Optional, Sequence

import numpy as np
import torch

from tsgd_ray.errors import UserError


class TooFewClips(UserError, ValueError):
    """A class has fewer real clips than the IPC asked for."""


def _class_rows(labels: torch.Tensor, num_classes: int, ipc: int) -> list[np.ndarray]:
    labels_np = labels.cpu().numpy()
    rows = [np.flatnonzero(labels_np == c) for c in range(num_classes)]
    short = [c for c, r in enumerate(rows) if len(r) < ipc]
    if short:
        raise TooFewClips(f"distill.ipc={ipc}: classes {short[:10]} have fewer real clips; lower distill.ipc")
    return rows


def random_real(
    video_ids: Sequence[str], labels: torch.Tensor, num_classes: int, ipc: int, seed: int, start: int = 0
) -> dict[int, list[int]]:
    """`ipc` clips per class from position `start` of the class's seeded order: ascending
    `seeded_priority(seed, video id)`, ties by id. The pipeline's one rule for real clips (the
    statistics pass keeps that order; random_real, packed_real and every real init read it, init
    draw d from d x PACK x IPC): a random sample without replacement, whatever order the clips
    come in, and the first `ipc` of a longer draw are the shorter one."""
    rows = _class_rows(labels, num_classes, start + ipc)
    ordered = {
        c: sorted(r.tolist(), key=lambda i: (seeded_priority(seed, video_ids[i]), video_ids[i]))
        for c, r in enumerate(rows)
    }
    return {c: ordered[c][start : start + ipc] for c in range(num_classes)}


def _pools(labels, num_classes: int, ipc: int, candidates: Optional[dict[int, list[int]]]) -> list[np.ndarray]:
    """Per class, the rows to choose from: `candidates[c]` (a seeded pool), else all of its rows."""
    rows = _class_rows(labels, num_classes, ipc)
    if candidates is None:
        return rows
    short = [c for c in range(num_classes) if len(candidates[c]) < ipc]
    if short:
        raise TooFewClips(f"ipc={ipc}: classes {short[:10]} have fewer candidates")
    return [np.asarray(candidates[c]) for c in range(num_classes)]


def k_center(
    features: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    ipc: int,
    candidates: Optional[dict[int, list[int]]] = None,
) -> dict[int, list[int]]:
    """Greedy k-center per class in cosine distance over features (N, D): start from the clip
    nearest the mean of the class's (unit) features, then repeatedly add the clip farthest from
    every clip chosen so far (ties: the earlier candidate). `candidates`: per class, the rows to choose from."""
    unit = torch.nn.functional.normalize(features.double().cpu(), dim=1)
    chosen: dict[int, list[int]] = {}
    for c, r in enumerate(_pools(labels, num_classes, ipc, candidates)):
        f = unit[torch.as_tensor(r)]
        picked = [int((f @ f.mean(0)).argmax())]
        nearest = 1 - f @ f[picked[0]]  # distance of each candidate to its nearest chosen clip
        nearest[picked[0]] = -math.inf
        for _ in range(1, ipc):
            picked.append(int(nearest.argmax()))
            nearest = torch.minimum(nearest, 1 - f @ f[picked[-1]])
            nearest[picked[-1]] = -math.inf  # never twice, even among identical clips
        chosen[c] = [int(r[i]) for i in picked]
    return chosen


def moderate(
    losses: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    ipc: int,
    candidates: Optional[dict[int, list[int]]] = None,
) -> dict[int, list[int]]:
    """The `ipc` clips per class whose teacher loss is nearest the class's median loss (neither
    the easiest nor the hardest; ties by row). `candidates`: per class, the rows to choose from."""
    losses_np = losses.cpu().double().numpy()
    chosen = {}
    for c, r in enumerate(_pools(labels, num_classes, ipc, candidates)):
        gap = np.abs(losses_np[r] - np.median(losses_np[r]))
        chosen[c] = r[np.lexsort((r, gap))[:ipc]].tolist()
    return chosen


def window_score(logits: torch.Tensor, labels: torch.Tensor, energy: torch.Tensor) -> torch.Tensor:
    """The saliency-guided score of candidate windows (N,): motion energy (`tsgf.motion_energy`,
    >= 0) x the teacher's margin (the softmax probability of the label minus the largest other
    one, in [-1, 1]), from logits (N, K): a window the teacher gets right and that moves scores > 0,
    one it gets wrong <= 0; among right ones, the more it moves and the surer the teacher, the higher."""
    p = torch.softmax(logits.float(), dim=1)
    own = p.gather(1, labels.view(-1, 1)).squeeze(1)
    other = p.scatter(1, labels.view(-1, 1), -1.0).amax(dim=1)
    return energy.float().to(p.device) * (own - other)


def flatten(choice: dict[int, list[int]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(rows, class ids, per-class indices), each (C * ipc,), in class then index order."""
    rows, classes, indices = [], [], []
    for c in sorted(choice):
        for i, row in enumerate(choice[c]):
            rows.append(row)
            classes.append(c)
            indices.append(i)
    return torch.tensor(rows), torch.tensor(classes), torch.tensor(indices)


def seeded_priority(seed: int, video_id: str) -> float:
    """A uniform number in [0, 1) fixed by (seed, video id): the `ipc` smallest of a class are a
    seeded random sample without replacement that does not depend on the order clips are seen in."""
    digest = hashlib.blake2b(f"{seed}:{video_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2.0**64


class BestPerClass:
    """The `cap` entries of smallest key per class, from entries seen in any order, in any number
    of mergeable pieces. Keys are compared as (key, video_id) so ties break the same way everywhere.

    Memory: at most 2 * cap entries per class seen.
    """

    def __init__(self, cap: int):
        self.cap = cap
        self.entries: dict[int, list[tuple]] = {}

    def add(self, label: int, key: float, entry: dict) -> None:
        rows = self.entries.setdefault(int(label), [])
        rows.append((float(key), str(entry["video_id"]), entry))
        if len(rows) >= 2 * self.cap:
            self._trim(int(label))

    def _trim(self, label: int) -> None:
        self.entries[label] = sorted(self.entries[label], key=lambda r: r[:2])[: self.cap]

    def trim(self) -> "BestPerClass":
        """Keep at most `cap` entries per class (before handing it over); returns self."""
        for label in list(self.entries):
            self._trim(label)
        return self

    def merge(self, other: "BestPerClass") -> None:
        for label, rows in other.entries.items():
            self.entries.setdefault(label, []).extend(rows)
            self._trim(label)

    def best(self, num_classes: int) -> list[list[dict]]:
        """Per class 0..K-1, its entries in key order (at most `cap`; a class never seen: [])."""
        self.trim()
        return [[r[2] for r in self.entries.get(c, [])] for c in range(num_classes)]
