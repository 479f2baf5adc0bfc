"""The request scheduler of `loopedlm serve`: a bounded queue, admission into a decode
engine's free slots between steps (continuous batching), per-sequence timeouts,
cancellation, and text: stop strings and incremental UTF-8-safe deltas.

The scheduler owns requests; the engine owns the model and the batch. What the scheduler
needs from an engine is `SlotEngine`, which `loopedlm.infer.engine.DecodeEngine` satisfies
as it is.

The engine runs on one worker thread (`Scheduler.start`); everything else may call
`submit` and `cancel` from any thread. A `Sequence` reports to its `sink` (called on the
worker thread) a `Delta` per token that produced new text, and a last one with its
`finish_reason`: "stop" (a stop string or the end-of-text token), "length" (max_tokens,
or the context is full), "timeout", "cancelled" or "error".
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from loopedlm.common.validation import is_int
from loopedlm.infer.engine import SequenceParams, StepOutput

log = logging.getLogger(__name__)


class SlotEngine(Protocol):
    """What the scheduler needs from a decode engine (`DecodeEngine`): slots 0 ..
    max_batch-1, each holding one sequence of at most max_len tokens (prompt and fed-back
    tokens). Calls come from one thread."""

    max_batch: int
    max_len: int

    def add(self, slot: int, prompt_ids: list[int], params: SequenceParams) -> Any:
        """Start a sequence in a free `slot`: prefill its prompt, sample its first token."""
        ...

    def step(self) -> StepOutput:
        """Feed every held sequence its last sampled token; sample one more for each."""
        ...

    def output(self, batch: int | None = None) -> StepOutput:
        """The outputs of the last step or add, per slot."""
        ...

    def release(self, slot: int) -> None:
        """Forget the sequence in `slot`; the slot is free again."""
        ...


class QueueFull(Exception):
    """The waiting queue cannot take these sequences (HTTP 429)."""


@dataclass
class Delta:
    """New text of a sequence, the loops spent on each token it came from, and, on the
    last delta only, why the sequence ended."""

    text: str
    loops: list[int]
    finish_reason: str | None = None


@dataclass(eq=False)
class Sequence:
    """One prompt to complete. `sink` receives its deltas (on the worker thread)."""

    prompt: list[int]
    params: SequenceParams
    max_tokens: int
    sink: Callable[[Delta], None]
    stop: tuple[str, ...] = ()
    stop_ids: frozenset[int] = frozenset()
    timeout: float | None = None
    tokens: list[int] = field(default_factory=list)
    loops: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    id: int = field(default_factory=itertools.count().__next__)

    def __post_init__(self) -> None:
        self.submitted = time.monotonic()
        self.deadline = None if self.timeout is None else self.submitted + self.timeout
        self._cancelled = False
        self._text = ""         # the completion's text so far (cut at a stop string)
        self._text_sent = 0     # characters of it already sent
        self._loops_sent = 0    # tokens whose loops were already sent

    @property
    def text(self) -> str:
        return self._text


class Scheduler:
    """Runs `engine` on a worker thread for the sequences submitted to it.

    max_queue: most sequences waiting for a slot; `submit` beyond it raises QueueFull.
    Admission is first come, first served; sequences with different loop counts share
    each step (the engine takes each row's output from its own last loop).
    """

    def __init__(self, engine: SlotEngine, tokenizer: Any, *, max_queue: int):
        if not is_int(max_queue) or max_queue < 0:
            raise ValueError(f"max_queue={max_queue!r} is not allowed: an integer >= 0")
        self.engine, self.tokenizer, self.max_queue = engine, tokenizer, max_queue
        self.waiting: deque[Sequence] = deque()
        self.running: dict[int, Sequence] = {}  # slot -> sequence
        self._cond = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        # totals for /metrics
        self.stats = dict(steps=0, tokens=0, loops=0, prompt_tokens=0, sequences=0)
        self.finished: dict[str, int] = {}

    # ---- any thread ---------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="loopedlm-scheduler", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Stop the worker; every unfinished sequence ends as "cancelled"."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join()

    def submit(self, sequences: list[Sequence]) -> None:
        """Queue sequences (all or none); QueueFull when they do not fit."""
        with self._cond:
            if self._stopping:
                raise QueueFull("the server is shutting down")
            if len(self.waiting) + len(sequences) > self.max_queue:
                raise QueueFull(f"the queue is full ({len(self.waiting)} of {self.max_queue} "
                                f"waiting); retry later")
            self.waiting.extend(sequences)
            self._cond.notify_all()

    def cancel(self, sequence: Sequence) -> None:
        """End `sequence` (the client went away); its slot is freed before the next step."""
        with self._cond:
            sequence._cancelled = True
            self._cond.notify_all()

    @property
    def queue_length(self) -> int:
        return len(self.waiting)

    @property
    def batch_size(self) -> int:
        return len(self.running)

    # ---- the worker thread --------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._stopping and not self.waiting and not self.running:
                    self._cond.wait()
                if self._stopping:
                    break
                admitted = self._take_admissible()
            try:
                self._expire()
                for slot, sequence in admitted:
                    self._start(slot, sequence)
                if self.running:
                    tokens, loops = self.engine.step().host()
                    self.stats["steps"] += 1
                    for slot in sorted(self.running):
                        if tokens[slot] < 0:  # the engine ended it (its cache is full)
                            raise RuntimeError(f"slot {slot} produced no token")
                        self._deliver(slot, tokens[slot], loops[slot])
            except Exception:  # the engine failed: end what it held, keep serving
                log.exception("decode step failed")
                for slot in list(self.running):
                    self._finish(slot, self.running[slot], "error")
        for slot in list(self.running):
            self._finish(slot, self.running[slot], "cancelled")
        with self._cond:
            waiting, self.waiting = list(self.waiting), deque()
        for sequence in waiting:
            self._end(sequence, "cancelled")

    def _take_admissible(self) -> list[tuple[int, Sequence]]:
        """Pop waiting sequences into free slots (FIFO); drop cancelled/expired ones."""
        now, kept = time.monotonic(), deque()
        for sequence in self.waiting:
            if sequence._cancelled:
                self._end(sequence, "cancelled")
            elif sequence.deadline is not None and now > sequence.deadline:
                self._end(sequence, "timeout")
            else:
                kept.append(sequence)
        self.waiting = kept
        free = [s for s in range(self.engine.max_batch) if s not in self.running]
        return [(slot, self.waiting.popleft()) for slot in free[:len(self.waiting)]]

    def _expire(self) -> None:
        now = time.monotonic()
        for slot, sequence in list(self.running.items()):
            if sequence._cancelled:
                self._finish(slot, sequence, "cancelled")
            elif sequence.deadline is not None and now > sequence.deadline:
                self._finish(slot, sequence, "timeout")

    def _start(self, slot: int, sequence: Sequence) -> None:
        try:
            self.engine.add(slot, sequence.prompt, sequence.params)
            tokens, loops = self.engine.output().host()
        except Exception:
            log.exception("prefill failed")
            self.engine.release(slot)  # whatever the engine did, the slot is free again
            self._end(sequence, "error")
            return
        self.running[slot] = sequence
        self.stats["prompt_tokens"] += len(sequence.prompt)
        self.stats["sequences"] += 1
        self._deliver(slot, tokens[slot], loops[slot])

    def _deliver(self, slot: int, token: int, loops: int) -> None:
        """Sequence `slot` sampled `token`, spending `loops` loops on it."""
        sequence = self.running[slot]
        if token in sequence.stop_ids:
            self._finish(slot, sequence, "stop")
            return
        sequence.tokens.append(token)
        sequence.loops.append(loops)
        self.stats["tokens"] += 1
        self.stats["loops"] += loops
        text = self.tokenizer.decode(sequence.tokens)
        sequence._text = text
        cut = find_stop(text, sequence.stop, sequence._text_sent)
        if cut is not None:
            sequence._text = text[:cut]
            self._finish(slot, sequence, "stop")
            return
        room = self.engine.max_len - len(sequence.prompt) + 1
        if len(sequence.tokens) >= min(sequence.max_tokens, room):
            self._finish(slot, sequence, "length")
            return
        # a character split over tokens spans at most 4 (UTF-8); longer runs are invalid bytes
        unsent = len(sequence.tokens) - sequence._loops_sent
        safe = safe_length(text, sequence.stop, hold_incomplete=unsent < 4)
        if safe > sequence._text_sent:
            self._send(sequence, safe, None)

    def _send(self, sequence: Sequence, upto: int, reason: str | None) -> None:
        text = sequence.text[sequence._text_sent:upto]
        loops = sequence.loops[sequence._loops_sent:]
        sequence._text_sent, sequence._loops_sent = upto, len(sequence.loops)
        try:
            sequence.sink(Delta(text, loops, reason))
        except Exception:
            log.exception("a sequence's sink failed")

    def _finish(self, slot: int, sequence: Sequence, reason: str) -> None:
        del self.running[slot]
        self.engine.release(slot)
        self._end(sequence, reason)

    def _end(self, sequence: Sequence, reason: str) -> None:
        sequence.finish_reason = reason
        self.finished[reason] = self.finished.get(reason, 0) + 1
        self._send(sequence, len(sequence.text), reason)


def find_stop(text: str, stops: tuple[str, ...], sent: int) -> int | None:
    """Where the first stop string starts in `text` (searching only where a new one can
    be: from the end of the sent text, less one stop's length), or None."""
    best = None
    for stop in stops:
        i = text.find(stop, max(0, sent - len(stop) + 1))
        if i >= 0 and (best is None or i < best):
            best = i
    return best


def safe_length(text: str, stops: tuple[str, ...], hold_incomplete: bool = True) -> int:
    """How much of `text` can be sent: not a trailing incomplete UTF-8 character (the
    tokenizer decodes it as U+FFFD; held back only while `hold_incomplete`) nor a tail
    that may begin a stop string."""
    end = len(text)
    while hold_incomplete and end > 0 and text[end - 1] == "\ufffd":
        end -= 1
    hold = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, end), hold, -1):
            if text[end - k:end] == stop[:k]:
                hold = k
                break
    return end - hold


__all__ = ["Scheduler", "SlotEngine", "Sequence", "Delta", "QueueFull", "find_stop", "safe_length"]
