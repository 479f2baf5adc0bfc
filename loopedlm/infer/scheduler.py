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

Failures stay with the sequence that caused them, as far as the scheduler can tell: a
failed prefill or a token that cannot be delivered ends that sequence alone ("error"). A
failed step ends the sequences that joined the batch since the last good step, and the
step is retried without them (a failed step has moved no slot on); only if it fails again
does every running sequence end. After any failure the engine counts as failing
(`health`) until a step succeeds again: when nothing is running, the worker checks it with
a one-token canary sequence, and again every `CHECK_EVERY` seconds while it fails.
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
from loopedlm.data.tokenizer import IncrementalText
from loopedlm.infer.engine import SequenceParams, StepOutput
from loopedlm.infer.sampling import SamplingParams

log = logging.getLogger(__name__)

CHECK_EVERY = 5.0  # seconds between canary checks of an engine that failed
CANARY = SequenceParams(sampling=SamplingParams(temperature=0), max_new_tokens=2)


class SlotEngine(Protocol):
    """What the scheduler needs from a decode engine (`DecodeEngine`): slots 0 ..
    max_batch-1, each holding one sequence of at most max_len tokens (prompt and fed-back
    tokens). Calls come from one thread."""

    max_batch: int
    max_len: int

    def add(self, slot: int, prompt_ids: list[int], params: SequenceParams) -> Any:
        """Start a sequence in a free `slot`: prefill its prompt, sample its first token."""
        ...

    def add_many(self, requests: list[tuple[int, list[int], SequenceParams]]
                 ) -> list[Exception | None]:
        """`add` for several (slot, prompt ids, params) at once, their prompts prefilled
        together. Per request: None (started) or the error that refused it (it alone);
        an error of the whole call leaves every slot of it free."""
        ...

    def step(self) -> StepOutput:
        """Feed every held sequence its last sampled token; sample one more for each. One
        that raises has moved no sequence on (it may be retried)."""
        ...

    def output(self, batch: int | None = None) -> StepOutput:
        """The outputs of the last step or add, per slot."""
        ...

    def release(self, slot: int) -> None:
        """Forget the sequence in `slot`; the slot is free again."""
        ...

    def prompt_loops(self, slot: int) -> int:
        """The loops the prompt of the sequence in `slot` ran, summed over its tokens (fewer
        than n_loops each where it stops adaptively)."""
        ...


class QueueFull(Exception):
    """The waiting queue cannot take these sequences (HTTP 429)."""


class Unavailable(Exception):
    """The scheduler is not running (shutting down, or its worker stopped): HTTP 503."""


@dataclass(frozen=True)
class TokenLogprob:
    """A generated token, its log-probability, the most likely tokens [(id, logprob)] at its
    place, and where its text starts in the completion (characters)."""

    token: int
    logprob: float
    top: list[tuple[int, float]]
    offset: int


@dataclass
class Delta:
    """New text of a sequence, the loops spent on each token it came from (and their
    logprobs, when asked for), and, on the last delta only, why the sequence ended."""

    text: str
    loops: list[int]
    finish_reason: str | None = None
    logprobs: list[TokenLogprob] = field(default_factory=list)


@dataclass(frozen=True)
class Health:
    """Whether the scheduler can generate: `ok`, else `reason`."""

    ok: bool
    reason: str = ""


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
    logprobs: list[TokenLogprob] = field(default_factory=list)  # when params.logprobs is set
    prompt_loops: int = 0  # the loops its prompt ran, summed over its tokens, once started
    finish_reason: str | None = None
    id: int = field(default_factory=itertools.count().__next__)

    def __post_init__(self) -> None:
        self.submitted = time.monotonic()
        self.deadline = None if self.timeout is None else self.submitted + self.timeout
        self._cancelled = False
        self._text = ""         # the completion's text so far (cut at a stop string)
        self._text_sent = 0     # characters of it already sent
        self._loops_sent = 0    # tokens whose loops were already sent
        self._logprobs_sent = 0  # tokens whose logprobs were already sent
        self._cut = False       # the text was cut at a stop string
        self._detokenizer: IncrementalText | None = None  # set once it runs

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
        self.engine_error: str | None = None  # the last failure, until a step succeeds
        self._next_check = 0.0  # when to run the canary of a failing engine (monotonic)
        # totals for /metrics
        self.stats = dict(steps=0, tokens=0, loops=0, prompt_tokens=0, prompt_loops=0,
                          sequences=0, failed_steps=0)
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
        """Queue sequences (all or none); QueueFull when they do not fit, Unavailable when
        the worker is not running."""
        with self._cond:
            if self._stopping:
                raise Unavailable("the server is shutting down")
            if self._thread is None or not self._thread.is_alive():
                raise Unavailable("the decode worker is not running (see the server's log)")
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

    def health(self) -> Health:
        """Whether sequences submitted now can be generated."""
        if self._stopping:
            return Health(False, "the server is shutting down")
        if self._thread is None or not self._thread.is_alive():
            return Health(False, "the decode worker is not running (see the server's log)")
        error = self.engine_error
        if error is not None:
            return Health(False, f"the decode engine failed ({error}); it is checked again "
                                 f"every {CHECK_EVERY:g} s")
        return Health(True)

    @property
    def queue_length(self) -> int:
        return len(self.waiting)

    @property
    def batch_size(self) -> int:
        return len(self.running)

    # ---- the worker thread --------------------------------------------------------------
    def _run(self) -> None:
        try:
            while True:
                with self._cond:
                    while not self._stopping and not self.waiting and not self.running:
                        if self.engine_error is not None:  # wake for the next canary
                            wait = self._next_check - time.monotonic()
                            if wait <= 0:
                                break
                            self._cond.wait(wait)
                        else:
                            self._cond.wait()
                    if self._stopping:
                        break
                    admitted = self._take_admissible()
                try:
                    self._expire()
                    joined = self._start_all(admitted)
                    if self.running:
                        self._step(joined)
                    elif self.engine_error is not None and time.monotonic() >= self._next_check:
                        self._check_engine()
                except Exception:  # a bug of the scheduler itself: end what it held, go on
                    log.exception("the scheduler failed")
                    for slot in list(self.running):
                        self._finish(slot, self.running[slot], "error")
        finally:  # closed, or the worker died: nothing is left waiting for a token
            reason = "cancelled" if self._stopping else "error"
            for slot in list(self.running):
                self._finish(slot, self.running[slot], reason)
            with self._cond:
                waiting, self.waiting = list(self.waiting), deque()
            for sequence in waiting:
                self._end(sequence, reason)

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

    def _failed(self, what: str, exc: Exception) -> None:
        """Note an engine failure: `health` reports it until a step succeeds."""
        log.error("%s failed: %s: %s", what, type(exc).__name__, exc, exc_info=exc)
        self.engine_error = f"{what}: {type(exc).__name__}: {exc}"[:300]
        self._next_check = time.monotonic()

    def _start_all(self, admitted: list[tuple[int, Sequence]]) -> list[int]:
        """Prefill the admitted sequences, together (`SlotEngine.add_many`: one pass for
        many prompts); the slots now running. A refused sequence ends alone; a failed pass
        ends every sequence of it."""
        if len(admitted) < 2:
            return [slot for slot, sequence in admitted if self._start(slot, sequence)]
        try:
            errors = self.engine.add_many([(slot, sequence.prompt, sequence.params)
                                           for slot, sequence in admitted])
            started = {slot: sequence for (slot, sequence), error
                       in zip(admitted, errors, strict=True) if error is None}
            tokens = loops = []
            logprobs = {}
            if started:
                output = self.engine.output()
                tokens, loops = output.host()
                logprobs = self._logprobs(output, started)
        except Exception as exc:
            self._failed("a prefill", exc)
            for slot, sequence in admitted:
                self.engine.release(slot)  # whatever the engine did, the slot is free again
                self._end(sequence, "error")
            return []
        for (_, sequence), error in zip(admitted, errors, strict=True):
            if error is not None:
                self._failed("a prefill", error)
                self._end(sequence, "error")
        for slot, sequence in started.items():
            self._started(slot, sequence)
            self._deliver_or_fail(slot, tokens[slot], loops[slot], logprobs.get(slot))
        return [slot for slot in started if slot in self.running]

    def _start(self, slot: int, sequence: Sequence) -> bool:
        """Prefill `sequence` into `slot`; whether it is running (a failure ends it alone)."""
        try:
            self.engine.add(slot, sequence.prompt, sequence.params)
            output = self.engine.output()
            tokens, loops = output.host()
            logprobs = self._logprobs(output, {slot: sequence})
        except Exception as exc:
            self._failed("a prefill", exc)
            self.engine.release(slot)  # whatever the engine did, the slot is free again
            self._end(sequence, "error")
            return False
        self._started(slot, sequence)
        self._deliver_or_fail(slot, tokens[slot], loops[slot], logprobs.get(slot))
        return slot in self.running

    def _started(self, slot: int, sequence: Sequence) -> None:
        """`sequence` runs in `slot`, its prompt prefilled: counted."""
        self.running[slot] = sequence
        sequence._detokenizer = IncrementalText(self.tokenizer)
        sequence.prompt_loops = self.engine.prompt_loops(slot)
        self.stats["prompt_tokens"] += len(sequence.prompt)
        self.stats["prompt_loops"] += sequence.prompt_loops
        self.stats["sequences"] += 1

    def _step(self, joined: list[int]) -> None:
        """One engine step for the running sequences; `joined`: the slots admitted just
        before it (the suspects if it fails)."""
        for attempt in range(2):
            stepped = False
            try:
                output = self.engine.step()
                stepped = True
                tokens, loops = output.host()
                logprobs = self._logprobs(output, self.running)
                break
            except Exception as exc:
                self._failed("a decode step", exc)
                self.stats["failed_steps"] += 1
                # a batched step cannot say which row failed it: first suspect the rows that
                # joined since the last good step and retry without them (a step that raised
                # moved no row on; one whose results could not be read may have), then all
                older = [slot for slot in self.running if slot not in joined]
                retry = attempt == 0 and not stepped and joined and older
                for slot in joined if retry else list(self.running):
                    if slot in self.running:
                        self._finish(slot, self.running[slot], "error")
                if not self.running:
                    return
        else:
            return
        self.engine_error = None
        self.stats["steps"] += 1
        for slot in sorted(self.running):
            self._deliver_or_fail(slot, tokens[slot], loops[slot], logprobs.get(slot))

    def _check_engine(self) -> None:
        """A one-token canary sequence on slot 0 (the engine is idle): does it generate?"""
        self._next_check = time.monotonic() + CHECK_EVERY
        try:
            try:
                self.engine.add(0, [0], CANARY)
                self.engine.step().host()
            finally:
                self.engine.release(0)
        except Exception as exc:
            self._failed("the canary check", exc)
            self._next_check = time.monotonic() + CHECK_EVERY
            return
        log.info("the decode engine works again (canary check)")
        self.engine_error = None

    @staticmethod
    def _logprobs(output: StepOutput, sequences: dict[int, Sequence]
                  ) -> dict[int, tuple[float, list[tuple[int, float]]]]:
        """(logprob, top tokens) of the `sequences` (slot -> sequence) that ask for them
        (brought to the host only then)."""
        wanted = [slot for slot, seq in sequences.items() if seq.params.logprobs is not None]
        if not wanted:
            return {}
        rows = output.host_logprobs()
        return {slot: rows[slot] for slot in wanted}

    def _deliver_or_fail(self, slot: int, token: int, loops: int,
                         logprob: tuple[float, list[tuple[int, float]]] | None) -> None:
        """Deliver a token; a failure (no token, a tokenizer error) ends this sequence alone."""
        sequence = self.running[slot]
        try:
            if token < 0:  # the engine ended it (its cache is full)
                raise RuntimeError(f"slot {slot} produced no token")
            self._deliver(slot, token, loops, logprob)
        except Exception:
            log.exception("delivering a token of sequence %d failed", sequence.id)
            if self.running.get(slot) is sequence:
                self._finish(slot, sequence, "error")

    def _deliver(self, slot: int, token: int, loops: int,
                 logprob: tuple[float, list[tuple[int, float]]] | None = None) -> None:
        """Sequence `slot` sampled `token`, spending `loops` loops on it."""
        sequence = self.running[slot]
        if token in sequence.stop_ids:
            self._finish(slot, sequence, "stop")
            return
        if logprob is not None and sequence.params.logprobs is not None:
            sequence.logprobs.append(TokenLogprob(token, logprob[0], logprob[1],
                                                  safe_length(sequence._text, ())))
        sequence.tokens.append(token)
        sequence.loops.append(loops)
        self.stats["tokens"] += 1
        self.stats["loops"] += loops
        text = sequence._detokenizer.text(sequence.tokens)  # decode(tokens), from its tail
        sequence._text = text
        cut = find_stop(text, sequence.stop, sequence._text_sent)
        if cut is not None:
            sequence._text, sequence._cut = text[:cut], True
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
        # the logprobs of the tokens whose text starts in what is sent (at the end: all,
        # but those cut off with a stop string)
        logprobs = [entry for entry in sequence.logprobs[sequence._logprobs_sent:]
                    if entry.offset < upto or (reason is not None and not sequence._cut)]
        sequence._text_sent, sequence._loops_sent = upto, len(sequence.loops)
        sequence._logprobs_sent += len(logprobs)
        if reason is not None:
            del sequence.logprobs[sequence._logprobs_sent:]
        try:
            sequence.sink(Delta(text, loops, reason, logprobs))
        except Exception:
            log.exception("a sequence's sink failed")

    def _finish(self, slot: int, sequence: Sequence, reason: str) -> None:
        del self.running[slot]
        try:
            self.engine.release(slot)
        finally:
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


__all__ = ["Scheduler", "SlotEngine", "Sequence", "Delta", "TokenLogprob", "Health", "QueueFull",
           "Unavailable", "find_stop", "safe_length", "CHECK_EVERY"]
