"""SIGTERM, what schedulers send before they kill a job, as a request to stop: the run
saves a checkpoint at the end of the current step and ends cleanly (every rank at the
same step)."""

from __future__ import annotations

import signal

from loopedlm.common.distributed import DistInfo, any_rank


class TerminationRequest:
    """SIGTERM (what schedulers send before they kill a job) only sets a flag: the loop
    saves a checkpoint at the end of the current step and stops cleanly."""

    def __init__(self) -> None:
        self.received = False
        self._previous = None

    def install(self) -> None:
        try:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread: leave SIGTERM alone
            self._previous = None

    def _handle(self, signum, frame) -> None:
        self.received = True

    def restore(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)

    def agreed(self, info: DistInfo) -> bool:
        """True when any rank received SIGTERM (every rank must stop at the same step)."""
        return any_rank(self.received, info)


__all__ = ["TerminationRequest"]
