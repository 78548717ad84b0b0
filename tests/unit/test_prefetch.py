"""`clip_cache.prefetched`: batches assembled ahead in a background thread, for the training loops."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from tsgd_ray.data.clip_cache import prefetched


def _producers() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "tsgd-prefetch"]


def test_the_same_batches_in_order_made_ahead_of_the_consumer():
    made = []

    def batches():
        for i in range(6):
            made.append(i)
            yield {"clip": torch.full((2, 3), i), "video_id": [f"v{i}"]}

    stream = prefetched(batches(), ahead=2)
    first = next(stream)
    deadline = time.time() + 5
    while len(made) < 4 and time.time() < deadline:  # the one taken, two queued, one waiting to be
        time.sleep(0.01)
    assert first["video_id"] == ["v0"] and made == [0, 1, 2, 3]
    rest = list(stream)
    assert [b["video_id"][0] for b in rest] == [f"v{i}" for i in range(1, 6)]
    assert all(torch.equal(b["clip"], torch.full((2, 3), i + 1)) for i, b in enumerate(rest))
    assert not _producers()


def test_the_producers_error_reaches_the_consumer_after_the_batches_before_it():
    def batches():
        yield {"clip": torch.zeros(1)}
        raise OSError("storage hiccup")

    got = []
    with pytest.raises(OSError, match="storage hiccup"):
        for batch in prefetched(batches()):
            got.append(batch)
    assert len(got) == 1 and not _producers()


def test_leaving_early_stops_the_producer():
    def endless():
        while True:
            yield {"clip": torch.zeros(1)}

    stream = prefetched(endless(), ahead=1)
    next(stream)
    stream.close()
    assert not _producers()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="page-locked memory needs CUDA")
def test_pinned_batches_are_page_locked():
    batch = next(prefetched(iter([{"clip": torch.zeros(4, dtype=torch.uint8), "video_id": ["a"]}]), pin=True))
    assert batch["clip"].is_pinned() and batch["video_id"] == ["a"]
