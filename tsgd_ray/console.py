"""What a user sees: the project's own progress on the console, everything in a log file.

`Console(root, command, verbose)` (a context manager, opened by the commands that start Ray):

- the `tsgd_ray` loggers' INFO lines go to the console (stderr), every logger's to the log file
  `<output_root>/logs/<command>-<UTC time>-<pid>.log` (written locally, then uploaded, for a remote
  root);
- the rest of what reaches the driver's stdout and stderr (Ray's and MLflow's own logging, Ray
  Data progress, the output of Ray workers and actors) goes to the log file, and to the console
  only when it carries `MARKER` (a `Progress` line from a worker), reports an error, or `verbose`.

`Progress` prints a throttled progress line with an ETA from inside actors and Ray Train workers.
`echo` prints results to the real stdout.
"""

from __future__ import annotations

import collections
import io
import logging
import os
import re
import sys
import tempfile
import time
import traceback
from datetime import datetime, timezone
from typing import Optional, TextIO

from tsgd_ray import storage

MARKER = "[tsgd-ray]"
# Lines from Ray or a worker that the console shows even when quiet.
_SHOW = re.compile(r"\b(ERROR|CRITICAL|FATAL)\b|killed due to memory pressure|OutOfMemoryError")
_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
_stdout: Optional[TextIO] = None  # the real stdout while a Console is open


def echo(text: str) -> None:
    """Print `text` to the real stdout (results, the table, where to look next)."""
    print(text, file=_stdout or sys.stdout, flush=True)


class _Console(logging.Filter):
    """The console shows the project's INFO lines and everyone's errors."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.name.startswith("tsgd_ray") or record.levelno >= logging.ERROR


#: Ray's colour codes and the suffix of its deduplicated lines: "... [repeated 2x across cluster]"
_RAY_DECORATION = re.compile(r"\x1b\[[0-9;]*m|\s*\[repeated \d+x across cluster\]")


class _Tee(io.TextIOBase):
    """A stdout/stderr stand-in: every line to the log file, some to the real stream."""

    # lines shown lately, on either stream: Ray forwards a Ray Train worker's print twice (its
    # stdout, and Ray Train's log of it on stderr), the second time maybe later, as "[repeated]"
    shown: collections.deque = collections.deque(maxlen=64)

    def __init__(self, real: TextIO, log: TextIO, verbose: bool):
        self.real, self.log, self.verbose = real, log, verbose
        self._partial = ""

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        self._partial += text
        *lines, self._partial = self._partial.split("\n")
        closed = self.log.closed  # a handler that outlived its command (e.g. Ray's) writes through
        for line in lines:
            if not closed:
                self.log.write(line + "\n")
            plain = _RAY_DECORATION.sub("", line)
            if (closed or self.verbose or MARKER in line or _SHOW.search(line)) and plain not in _Tee.shown:
                self.real.write(line + "\n")
                _Tee.shown.append(plain)
        self.flush()
        return len(text)

    def flush(self) -> None:
        if not self.log.closed:
            self.log.flush()
        self.real.flush()

    def isatty(self) -> bool:
        return False

    def fileno(self) -> int:
        return self.real.fileno()


class Console:
    """Quiet console and full log file for one command; see the module docstring."""

    def __init__(self, output_root: str, command: str, verbose: bool = False):
        stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
        self.uri = storage.OutputRoot(output_root).uri("logs", f"{command}-{stamp}-{os.getpid()}.log")
        self.verbose = verbose
        if storage.is_local(self.uri):
            os.makedirs(os.path.dirname(self.uri), exist_ok=True)
            self.path = self.uri
        else:
            self.path = os.path.join(tempfile.mkdtemp(prefix="tsgd-ray-log-"), os.path.basename(self.uri))

    def __enter__(self) -> "Console":
        global _stdout
        self.file = open(self.path, "a", encoding="utf-8")
        self.saved = (sys.stdout, sys.stderr, _stdout)
        root = logging.getLogger()
        self.root_state = root.level, root.handlers[:]
        for handler in self.root_state[1]:
            root.removeHandler(handler)
        self.handlers = [logging.StreamHandler(self.file), logging.StreamHandler(sys.stderr)]
        self.handlers[0].setFormatter(logging.Formatter(_FORMAT))
        self.handlers[1].setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
        if not self.verbose:
            self.handlers[1].addFilter(_Console())
        for handler in self.handlers:
            root.addHandler(handler)
        root.setLevel(logging.INFO)
        logging.getLogger("tsgd_ray").setLevel(logging.INFO)
        _stdout = sys.stdout
        sys.stdout = _Tee(sys.stdout, self.file, self.verbose)
        sys.stderr = _Tee(sys.stderr, self.file, self.verbose)
        logging.getLogger(__name__).info("log file: %s", self.uri)
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        global _stdout
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        if exc is not None:  # the whole chain, in the file; the console gets one line (cli)
            self.file.write("".join(traceback.format_exception(exc_type, exc, tb)))
        sys.stdout, sys.stderr, _stdout = self.saved
        root = logging.getLogger()
        for handler in self.handlers:
            root.removeHandler(handler)
        root.setLevel(self.root_state[0])
        for handler in self.root_state[1]:
            root.addHandler(handler)
        self.file.close()
        if self.path != self.uri:
            try:
                with open(self.path, "rb") as f:
                    storage.write_once(self.uri, f.read())
            except OSError as error:  # the run's own outcome matters more than its log
                print(f"tsgd-ray: could not upload the log file to {self.uri}: {error}", file=sys.stderr)


class Progress:
    """A progress line from a loop in an actor or a Ray Train worker: at most one per `every`
    seconds, and the last one when `last`; `update(done, **values)` with done in 1..total."""

    def __init__(self, name: str, total: int, unit: str, every: float = 30.0, last: bool = True):
        self.name, self.total, self.unit, self.every, self.last = name, total, unit, every, last
        self.started = self.printed = time.monotonic()
        self.first: Optional[int] = None

    def update(self, done: int, **values: float) -> None:
        now = time.monotonic()
        if self.first is None:
            self.first = done - 1  # resumed loops count from where they started
        if now - self.printed < self.every and not (self.last and done >= self.total):
            return
        self.printed = now
        rate = (now - self.started) / max(1, done - self.first)
        shown = "".join(f", {k} {v:.4g}" for k, v in values.items())
        eta = "" if done >= self.total else f", ETA {_duration(rate * (self.total - done))}"
        print(f"{MARKER} {self.name}: {self.unit} {done}/{self.total}{shown}{eta}", flush=True)


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.0f} min"
