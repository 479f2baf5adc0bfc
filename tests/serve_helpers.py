"""Helpers shared by the serving tests (a helper module, not a test file): a tiny run saved
as `loopedlm serve` reads it, a live server on a thread over it (optionally with an engine
whose steps wait on a gate), and the reference completion of a prompt alone."""

from __future__ import annotations

import threading
import time
from pathlib import Path

from conftest import tiny_model

from loopedlm.infer.engine import DecodeEngine
from loopedlm.infer.generate import generate
from loopedlm.infer.server import ServeConfig, create_app, serve_in_background

TEXTS = ["To be, or not to be, that is the question. Whether 'tis nobler in the mind."] * 20


def make_model(mode: str = "flt", **overrides):
    return tiny_model(std=0.1, loop_mode=mode, **{"sequence_len": 32, **overrides})


def save_tiny_run(folder: Path) -> Path:
    """A tiny random FLT saved as a run (checkpoint + tokenizer) under `folder`."""
    from loopedlm.data.tokenizer_training import train_tokenizer
    from loopedlm.model.checkpoint import save_model

    tokenizer = train_tokenizer(TEXTS, vocab_size=300)
    model = make_model("flt", vocab_size=tokenizer.vocab_size, sequence_len=48)
    run = folder / "tinyrun"
    save_model(run / "checkpoints" / "step_000010", model)
    tokenizer.save(run / "tokenizer")
    return run


def load_tiny_run(run: Path):
    """(model, tokenizer) of a run, as the server loads them."""
    from loopedlm.data.runs import load_run

    loaded = load_run(run)
    return loaded.model, loaded.tokenizer


class SlowEngine(DecodeEngine):
    """A decode engine whose steps wait on a gate and take at least `delay` seconds."""

    def __init__(self, model, delay: float = 0.0, **options):
        super().__init__(model, **options)
        self.delay, self.gate = delay, threading.Event()
        self.gate.set()

    def step(self):
        self.gate.wait()
        time.sleep(self.delay)
        return super().step()


def start(model_and_tokenizer, *, delay: float | None = None, engine_class=None,
          tokenizer=None, **config):
    """(the server as a context manager yielding its URL, its engine or None)."""
    model, default_tokenizer = model_and_tokenizer
    config = ServeConfig(**{"max_loops": 6, **config})
    engine = None
    if delay is not None or engine_class is not None:
        engine = (engine_class or SlowEngine)(model, delay or 0.0, max_batch=config.max_batch,
                                              max_loops=6)
    app = create_app(model, tokenizer or default_tokenizer, name="tinyrun", config=config,
                     engine=engine)
    return serve_in_background(app), engine


def reference(model_and_tokenizer, prompt, **options):
    model, tokenizer = model_and_tokenizer
    return generate(model, prompt, tokenizer=tokenizer, stop=[tokenizer.bos_id], **options)


def wait_until(condition, seconds: float = 30.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.02)
