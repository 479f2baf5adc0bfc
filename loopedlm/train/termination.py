"""SIGTERM (what schedulers send before they kill a job) and SIGINT (Ctrl-C) as a request
to stop: the run saves a checkpoint at the end of the current step and ends cleanly (every
rank at the same step). A second Ctrl-C aborts at once (KeyboardInterrupt)."""

from __future__ import annotations

import logging
import signal

from loopedlm.common.distributed import DistInfo, any_rank

log = logging.getLogger(__name__)

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class TerminationRequest:
    """SIGTERM or SIGINT only sets a flag (`signal_name` says which came first): the loop
    saves a checkpoint at the end of the current step and stops cleanly."""

    def __init__(self) -> None:
        self.received = False
        self.signal_name: str | None = None
        self._previous: dict[int, object] = {}

    def install(self) -> None:
        for signum in SIGNALS:
            try:
                self._previous[signum] = signal.signal(signum, self._handle)
            except ValueError:  # not the main thread: leave the signals alone
                pass

    def _handle(self, signum, frame) -> None:
        if self.received and signum == signal.SIGINT:  # a second Ctrl-C: stop now
            raise KeyboardInterrupt
        self.received = True
        self.signal_name = signal.Signals(signum).name
        log.warning("%s: the run stops after this step, with a checkpoint%s", self.signal_name,
                    " (Ctrl-C again aborts at once)" if signum == signal.SIGINT else "")

    def restore(self) -> None:
        for signum, previous in self._previous.items():
            if previous is not None:
                signal.signal(signum, previous)
        self._previous = {}

    def agreed(self, info: DistInfo) -> bool:
        """True when any rank received SIGTERM or SIGINT (every rank must stop at the same
        step)."""
        return any_rank(self.received, info)


__all__ = ["TerminationRequest", "SIGNALS"]
