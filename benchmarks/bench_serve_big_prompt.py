"""A big prompt against `loopedlm serve` (issue 22, D5): does it hold up everyone else?

While one client sends a prompt of `--mb` megabytes (refused as longer than the context:
after tokenizing it on the event loop before issue 22; now at once, from its length), or
`--concurrent` clients each send a long prompt that is tokenized (the context times a
token's most bytes: off the event loop since issue 22), another client polls GET /health every 10 ms and a
third streams greedy completions one after another. Printed: how long the big requests
took, the slowest and median /health answer and the longest gap between two streamed
events, each beside the same figure measured just before on the idle server (the baseline:
the ratio is what to compare across machines). Then the big prompt against the default
body limit (`--max-body-bytes`, 1 MiB): how fast the 413 comes.

The server runs in this process (uvicorn on a thread) over a stand-in run (the tiny preset
with random weights: benchmarks/bench_serve.py), so the script also runs against another
checkout: `PYTHONPATH=/path/to/other python benchmarks/bench_serve_big_prompt.py`.

    python benchmarks/bench_serve_big_prompt.py [--mb 10]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx2 as httpx
from bench_serve import PROMPTS, stand_in_run

from loopedlm.data.runs import load_run
from loopedlm.infer.server import ServeConfig, create_app, serve_in_background

STREAM = {"prompt": PROMPTS[0], "max_tokens": 24, "temperature": 0, "stream": True}


class Poller(threading.Thread):
    """GET /health every `every` seconds until stopped; the seconds each answer took."""

    def __init__(self, url: str, every: float = 0.01):
        super().__init__(daemon=True)
        self.url, self.every, self.stop, self.times = url, every, threading.Event(), []

    def run(self) -> None:
        with httpx.Client(timeout=120) as client:
            while not self.stop.is_set():
                began = time.perf_counter()
                client.get(f"{self.url}/health")
                self.times.append(time.perf_counter() - began)
                time.sleep(self.every)


class Streamer(threading.Thread):
    """Streams STREAM over and over until stopped; the gaps between consecutive events."""

    def __init__(self, url: str):
        super().__init__(daemon=True)
        self.url, self.stop, self.gaps = url, threading.Event(), []

    def run(self) -> None:
        with httpx.Client(timeout=120) as client:
            while not self.stop.is_set():
                with client.stream("POST", f"{self.url}/v1/completions", json=STREAM) as r:
                    last = time.perf_counter()
                    for line in r.iter_lines():
                        if line.startswith("data: "):
                            now = time.perf_counter()
                            self.gaps.append(now - last)
                            last = now


def measure(url: str, seconds: float, during=None) -> tuple[list[float], list[float], object]:
    """(/health times, stream gaps, what `during()` returned) over `seconds` or `during`."""
    poller, streamer = Poller(url), Streamer(url)
    poller.start()
    streamer.start()
    time.sleep(0.5)  # both running
    result = during() if during else time.sleep(seconds)
    poller.stop.set()
    streamer.stop.set()
    poller.join()
    streamer.join()
    return poller.times, streamer.gaps, result


def ms(values: list[float]) -> str:
    return f"max {max(values) * 1000:7.1f} ms, median {statistics.median(values) * 1000:6.1f} ms"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mb", type=float, default=10.0, help="the big prompt's size (MB)")
    parser.add_argument("--concurrent", type=int, default=8,
                        help="clients sending a long prompt at once")
    args = parser.parse_args()
    big = json.dumps({"prompt": "To be, or not to be, that is the question. "
                                * int(args.mb * 1e6 / 44), "max_tokens": 1}).encode()
    with tempfile.TemporaryDirectory() as tmp:
        loaded = load_run(stand_in_run(Path(tmp)))
    fields = {f.name for f in dataclasses.fields(ServeConfig)}
    limit = {"max_body_bytes": 2 * len(big)} if "max_body_bytes" in fields else {}
    app = create_app(loaded.model, loaded.tokenizer, name="stand-in", config=ServeConfig(**limit))
    with serve_in_background(app) as url:
        httpx.post(f"{url}/v1/completions", json={**STREAM, "stream": False}, timeout=120)

        def send_big():
            began = time.perf_counter()
            r = httpx.post(f"{url}/v1/completions", content=big, timeout=600,
                           headers={"content-type": "application/json"})
            return r.status_code, time.perf_counter() - began

        # a long prompt that is tokenized: the context times a token's most characters
        fits = "x" * (int(loaded.tokenizer.token_bytes().max()) * loaded.model.config.sequence_len)
        long = json.dumps({"prompt": fits, "max_tokens": 1}).encode()

        def send_long():
            began = time.perf_counter()
            with ThreadPoolExecutor(args.concurrent) as pool:
                codes = list(pool.map(lambda _: httpx.post(
                    f"{url}/v1/completions", content=long, timeout=600,
                    headers={"content-type": "application/json"}).status_code,
                    range(args.concurrent)))
            return sorted(set(codes)), time.perf_counter() - began

        idle_health, idle_gaps, _ = measure(url, 3.0)
        health, gaps, (status, took) = measure(url, 0, send_big)
        long_health, long_gaps, (codes, long_took) = measure(url, 0, send_long)
    print(f"/health       idle: {ms(idle_health)}")
    print(f"stream gap    idle: {ms(idle_gaps)}")
    print(f"a {len(big) / 1e6:.1f} MB prompt: answered {status} after {took:.2f} s")
    print(f"  /health:    {ms(health)}  ({max(health) / max(idle_health):.1f}x the idle max)")
    print(f"  stream gap: {ms(gaps)}  ({max(gaps) / max(idle_gaps):.1f}x the idle max)")
    print(f"{args.concurrent} prompts of {len(fits)} characters at once: answered {codes} after "
          f"{long_took:.2f} s")
    print(f"  /health:    {ms(long_health)}  ({max(long_health) / max(idle_health):.1f}x the "
          f"idle max)")
    print(f"  stream gap: {ms(long_gaps)}  ({max(long_gaps) / max(idle_gaps):.1f}x the idle "
          f"max)")
    if limit:  # this server has a body limit: the default one refuses the prompt at once
        app = create_app(loaded.model, loaded.tokenizer, name="stand-in", config=ServeConfig())
        with serve_in_background(app) as url:
            began = time.perf_counter()
            r = httpx.post(f"{url}/v1/completions", content=big, timeout=600,
                           headers={"content-type": "application/json"})
            print(f"default --max-body-bytes ({ServeConfig().max_body_bytes}): {r.status_code} "
                  f"after {time.perf_counter() - began:.3f} s")


if __name__ == "__main__":
    main()
