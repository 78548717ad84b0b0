"""Stage leases: one run at a time works in a stage folder.

A lease is a numbered series of small write-once objects ``<folder>/_lease/<generation>.json``
({holder, host, pid, expires, released}); the newest generation is the lease. Taking a free,
released or expired lease means writing the next generation, and `storage.write_once` lets exactly
one writer create it, so two runs never both hold a stage. The holder renews by writing the next
generation every `seconds / 4` from a background thread; a holder that dies stops renewing, and
its lease expires `seconds` after the last renewal. On release it writes a released generation and
removes the older ones where storage allows deletes (the only deletes the pipeline makes).

Expiry compares wall clocks of the holder and the waiter: hosts should be NTP-synchronised (a skew
well under `seconds`).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from contextlib import contextmanager
from typing import Iterator, Optional

from tsgd_ray import storage
from tsgd_ray.errors import UserError

log = logging.getLogger(__name__)

FOLDER = "_lease"
WAIT_LOG_SECONDS = 60.0


class LeaseHeld(UserError, RuntimeError):
    """Another run holds the stage and the config says not to wait (storage.wait_for_lease=false)."""


def _generation(uri: str) -> int:
    return int(uri.rsplit("/", 1)[-1].split(".", 1)[0])


def _uri(folder: str, generation: int) -> str:
    return storage.join(folder, FOLDER, f"{generation:012d}.json")


def newest(folder: str) -> tuple[int, Optional[dict]]:
    """(generation, content) of the lease of `folder`, or (-1, None) when there has been none."""
    uris = storage.list_files(storage.join(folder, FOLDER), ["json"])
    if not uris:
        return -1, None
    latest = max(uris, key=_generation)
    return _generation(latest), storage.read_json(latest)


def _free(content: Optional[dict], now: float) -> bool:
    return content is None or content["released"] or content["expires"] < now


def describe(content: dict) -> str:
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(content["since"]))
    return f"host {content['host']} pid {content['pid']} (since {started})"


class _Holder:
    def __init__(self, folder: str, seconds: float):
        self.folder, self.seconds = folder, seconds
        self.identity = {
            "holder": uuid.uuid4().hex,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "since": time.time(),
        }
        self.generation = -1
        self.lost = False
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def _write(self, generation: int, released: bool = False) -> bool:
        content = {**self.identity, "expires": time.time() + self.seconds, "released": released}
        if storage.write_once(_uri(self.folder, generation), json.dumps(content).encode()):
            self.generation = generation
            return True
        return False

    def try_take(self) -> Optional[dict]:
        """Take the lease if it is free; returns None when taken, else the holder's content."""
        generation, content = newest(self.folder)
        if not _free(content, time.time()):
            return content
        if self._write(generation + 1):
            self._thread = threading.Thread(target=self._renew, name=f"lease-{self.folder}", daemon=True)
            self._thread.start()
            return None
        return newest(self.folder)[1]  # another run took it first

    def _renew(self) -> None:
        while not self._stop.wait(self.seconds / 4):
            try:
                if not self._write(self.generation + 1):
                    self.lost = True
                    log.error(
                        "lease on %s was taken by another run (this one did not renew it in time); "
                        "outputs stay write-once, but two runs now work on this stage",
                        self.folder,
                    )
                    return
            except OSError as exc:  # a storage hiccup: try again at the next beat, the lease has slack
                log.warning("renewing the lease on %s failed (%s); retrying", self.folder, exc)

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self.lost or self.generation < 0:
            return
        if self._write(self.generation + 1, released=True):
            try:  # tidy the older generations; without delete rights they stay (a few hundred bytes each)
                for uri in storage.list_files(storage.join(self.folder, FOLDER), ["json"]):
                    if _generation(uri) < self.generation:
                        storage.remove(uri)
            except OSError as exc:
                log.info("old lease generations under %s stay (%s)", self.folder, exc)


@contextmanager
def hold(folder: str, seconds: float, wait: bool, what: str) -> Iterator[None]:
    """Hold the lease of stage folder `folder` for the body; `what` names the stage in messages.

    While another run holds it: wait (logging every minute) when `wait`, else raise LeaseHeld.
    A lease whose holder stopped renewing is taken over once it has expired.
    """
    holder = _Holder(folder, seconds)
    since, next_log = time.time(), 0.0
    while (other := holder.try_take()) is not None:
        message = (
            f"{what}: another run works on {folder}: {describe(other)}; if it has died, its lease "
            f"expires in {max(0.0, other['expires'] - time.time()):.0f} s"
        )
        if not wait:
            raise LeaseHeld(f"{message} (storage.wait_for_lease=false)")
        if time.time() >= next_log:
            log.warning("%s; waiting (%.0f s so far)", message, time.time() - since)
            next_log = time.time() + WAIT_LOG_SECONDS
        time.sleep(min(5.0, seconds / 4))
    try:
        yield
    finally:
        holder.release()
