"""Preemption signals: SIGTERM / SIGUSR1 ask the trainer to save and exit 0 (requeue-friendly)."""

from __future__ import annotations

import signal
import time


class PreemptionFlag:
    """Records that a stop was requested; receiving the signal twice is harmless."""

    def __init__(self, signals=(signal.SIGTERM, signal.SIGUSR1)):
        self.requested = False
        self.signal_name: str | None = None
        self.first_at: float | None = None
        self._previous = {}
        for sig in signals:
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        if not self.requested:
            self.first_at = time.time()
        self.requested = True
        self.signal_name = signal.Signals(signum).name

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
