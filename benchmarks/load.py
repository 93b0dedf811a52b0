"""The machine's load average, sampled in the background during the run."""

from __future__ import annotations

import os
import statistics
import threading
from typing import Self


class LoadSampler:
    """Samples ``os.getloadavg()[0]`` (1-minute load) every ``every`` seconds until stopped.

    Use as a context manager; :meth:`summary` gives start, end, min, median and max.
    """

    def __init__(self, every: float = 2.0) -> None:
        self.every = every
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while True:
            self.samples.append(os.getloadavg()[0])
            if self._stop.wait(self.every):
                return

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.samples.append(os.getloadavg()[0])

    def summary(self) -> str:
        s = self.samples or [os.getloadavg()[0]]
        return (f"{s[0]:.1f} at the start, {s[-1]:.1f} at the end; during the run min "
                f"{min(s):.1f}, median {statistics.median(s):.1f}, max {max(s):.1f} "
                f"({len(s)} samples)")
