"""Peak memory of a block of work: a lifecycle stage (`llmops.cache` records it beside the stage's build times) and,
inside the evaluation stage, a candidate loaded and generating (its `peak_memory_mb`).

On CUDA, the allocator's peak. On CPU, the resident set's high-water mark (VmHWM), which Linux resets through
/proc/self/clear_refs; it is approximate (the C allocator may reuse memory the process already held). Blocks nest:
a reset inside a block first folds the high-water mark reached so far into every open block, so the stage that
contains an evaluation still sees the evaluation's peak.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import threading
from pathlib import Path
from typing import ClassVar

import torch

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def _status_bytes(key: str) -> int:
    for line in _STATUS.read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise OSError(f"{_STATUS} has no {key}")


class PeakMemory:
    """Memory from construction on: `mb()` above what the process held at the start, `peak_mb()` in all."""

    _open: ClassVar[list[PeakMemory]] = []
    _lock: ClassVar[threading.Lock] = threading.Lock()

    def __init__(self) -> None:
        self.cuda = torch.cuda.is_available()
        self._seen = 0
        self._closed = False
        if self.cuda:
            with PeakMemory._lock:
                self._fold_into_open()
                torch.cuda.reset_peak_memory_stats()
                self.base = torch.cuda.memory_allocated()
                PeakMemory._open.append(self)
            return
        gc.collect()
        with contextlib.suppress(OSError, AttributeError):  # freed memory back to the OS: the base is what is held
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        with PeakMemory._lock:
            try:
                self._fold_into_open()
                _CLEAR_REFS.write_text("5")
                self.base = _status_bytes("VmRSS")
            except OSError:
                self.base = -1
                return
            PeakMemory._open.append(self)

    @staticmethod
    def _fold_into_open() -> None:
        """What the open blocks have reached so far, kept before the high-water mark is reset."""
        if PeakMemory._open:
            high = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else _status_bytes("VmHWM")
            for block in PeakMemory._open:
                block._seen = max(block._seen, high)

    def _peak_bytes(self) -> int:
        if self._closed:
            return self._seen
        return max(self._seen, torch.cuda.max_memory_allocated() if self.cuda else _status_bytes("VmHWM"))

    def mb(self) -> float | None:
        """The peak above what the process held at the start (None where it cannot be read)."""
        if not self.cuda and self.base < 0:
            return None
        return (self._peak_bytes() - self.base) / 2**20

    def peak_mb(self) -> float | None:
        """The peak in all: the resident set's high-water mark (on CUDA, the allocator's peak)."""
        if not self.cuda and self.base < 0:
            return None
        return self._peak_bytes() / 2**20

    def close(self) -> None:
        """Ends the block: later resets no longer fold into it (its figures stay as they were)."""
        with PeakMemory._lock:
            if not self._closed and (self.cuda or self.base >= 0):
                self._seen = self._peak_bytes()
            self._closed = True
            if self in PeakMemory._open:
                PeakMemory._open.remove(self)

    def __enter__(self) -> PeakMemory:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
