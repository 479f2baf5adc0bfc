"""`loopedlm serve` under load (issue 12): throughput scaling with concurrent clients,
latency, and a load test that checks nothing is lost, duplicated or mixed up.

1. Scaling: C concurrent streaming clients (C = 1 and 16 by default), each sending
   `--requests` requests in a row; aggregate generated tokens/s, p50/p99 request latency
   and time to first token. The target: tokens/s at 16 clients >= 4x one client's.
2. Load test: 64 streaming clients x 20 requests each (`--load-clients`,
   `--load-requests`). Requests are greedy, over a few (prompt, n_loops) combinations
   whose expected completion is fetched once, alone, first; every answer must arrive
   exactly once (one final chunk, one `data: [DONE]`, a unique id on all its chunks) and
   equal the expected completion of its own combination, with its loop count on every
   token.

The server runs as `loopedlm serve RUN` in a subprocess (its torch on `--threads`
threads) unless `--url` points at a running one; clients are asyncio + httpx2 (the
openai package's HTTP client) in this process. Without `--run`, a stand-in run is
made: the tiny preset's shape with random weights and a BPE trained on a few lines
(speed does not depend on the weights).

    python benchmarks/bench_serve.py --run runs/tiny-... [--clients 1,16] [--skip-load]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx2 as httpx

PROMPTS = ["To be, or not to be", "The king", "O Romeo", "All the world's a stage",
           "Of man's first disobedience", "Now is the winter", "Friends, Romans", "Shall I"]


@dataclass
class Answer:
    """One streamed completion as the client saw it."""

    key: tuple
    text: str = ""
    loops: list[int] = field(default_factory=list)
    ids: set[str] = field(default_factory=set)
    finishes: int = 0
    done_markers: int = 0
    status: int = 0
    start: float = 0.0
    first_token: float | None = None
    end: float = 0.0


async def stream_one(client: httpx.AsyncClient, url: str, body: dict, key: tuple) -> Answer:
    answer = Answer(key, start=time.perf_counter())
    async with client.stream("POST", f"{url}/v1/completions",
                             json={**body, "stream": True, "return_loops": True}) as r:
        answer.status = r.status_code
        if r.status_code != 200:
            await r.aread()
            answer.end = time.perf_counter()
            return answer
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                answer.done_markers += 1
                continue
            chunk = json.loads(line[6:])
            answer.ids.add(chunk["id"])
            for choice in chunk["choices"]:
                if answer.first_token is None and choice["loops"]:
                    answer.first_token = time.perf_counter()
                answer.text += choice["text"]
                answer.loops += choice["loops"]
                answer.finishes += choice["finish_reason"] is not None
    answer.end = time.perf_counter()
    return answer


async def run_clients(url: str, plans: list[list[tuple[tuple, dict]]]) -> tuple[list[Answer], float]:
    """Each plan is one client's requests (key, body), sent one after another; all
    clients run concurrently. Returns the answers and the wall time."""
    limits = httpx.Limits(max_connections=len(plans) + 4, max_keepalive_connections=len(plans) + 4)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        async def client_run(plan):
            return [await stream_one(client, url, body, key) for key, body in plan]
        start = time.perf_counter()
        results = await asyncio.gather(*(client_run(p) for p in plans))
        wall = time.perf_counter() - start
    return [a for answers in results for a in answers], wall


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, round(q * (len(values) - 1)))]


def summarize(answers: list[Answer], wall: float) -> dict:
    tokens = sum(len(a.loops) for a in answers)
    latency = [a.end - a.start for a in answers]
    ttft = [a.first_token - a.start for a in answers if a.first_token is not None]
    return {"requests": len(answers), "tokens": tokens, "wall_s": wall,
            "tokens_per_s": tokens / wall, "p50_s": percentile(latency, 0.5),
            "p99_s": percentile(latency, 0.99),
            "ttft_p50_s": percentile(ttft, 0.5) if ttft else float("nan")}


def scaling(url: str, clients: int, requests: int, max_tokens: int, n_loops: int | None) -> dict:
    plans = [[((c, i), {"prompt": PROMPTS[(c + i) % len(PROMPTS)], "max_tokens": max_tokens,
                        "temperature": 0.8, "seed": c * 1000 + i,
                        **({} if n_loops is None else {"n_loops": n_loops})})
              for i in range(requests)] for c in range(clients)]
    answers, wall = asyncio.run(run_clients(url, plans))
    bad = [a for a in answers if a.status != 200]
    if bad:
        raise RuntimeError(f"{len(bad)} requests failed (status {bad[0].status})")
    return summarize(answers, wall)


def load_test(url: str, clients: int, requests: int, max_tokens: int,
              loop_counts: tuple[int, ...] = (1, 2, 3)) -> dict:
    """The load test; raises AssertionError naming what went wrong."""
    combos = [(p, n) for p in PROMPTS[:4] for n in loop_counts]
    expected = {}
    for prompt, n_loops in combos:  # alone, one at a time
        r = httpx.post(f"{url}/v1/completions", timeout=600, json={
            "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "n_loops": n_loops,
            "return_loops": True})
        r.raise_for_status()
        expected[(prompt, n_loops)] = r.json()["choices"][0]
    plans = []
    for c in range(clients):
        plan = []
        for i in range(requests):
            prompt, n_loops = combos[(c * 7 + i) % len(combos)]
            plan.append(((c, i, prompt, n_loops), {
                "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                "n_loops": n_loops}))
        plans.append(plan)
    answers, wall = asyncio.run(run_clients(url, plans))
    assert len(answers) == clients * requests, "requests lost"
    assert len({a.key[:2] for a in answers}) == clients * requests, "requests duplicated"
    ids = [next(iter(a.ids)) for a in answers if len(a.ids) == 1]
    for a in answers:
        prompt, n_loops = a.key[2:]
        want = expected[(prompt, n_loops)]
        assert a.status == 200, f"request {a.key} got HTTP {a.status}"
        assert len(a.ids) == 1, f"request {a.key} saw chunks of {len(a.ids)} completions"
        assert a.finishes == 1 and a.done_markers == 1, \
            f"request {a.key}: {a.finishes} final chunks, {a.done_markers} [DONE] markers"
        assert a.text == want["text"], f"request {a.key} got another completion's text"
        assert a.loops == [n_loops] * len(a.loops) and len(a.loops) == len(want["loops"]), \
            f"request {a.key} got loops {a.loops}, expected {want['loops']}"
    assert len(set(ids)) == len(answers), "two requests shared a completion id"
    return summarize(answers, wall)


# ---- the server ---------------------------------------------------------------------------------
def stand_in_run(folder: Path) -> Path:
    """The tiny preset's shape with random weights, and a small BPE (speed only)."""
    import torch

    from loopedlm import LoopedGPT, ModelConfig
    from loopedlm.data.tokenizer_training import train_tokenizer
    from loopedlm.model.checkpoint import save_model

    texts = [" ".join(PROMPTS) + f" {i} " + "the quick brown fox jumps over the lazy dog. " * 4
             for i in range(200)]
    tokenizer = train_tokenizer(texts, vocab_size=400)
    config = ModelConfig.preset("tiny", vocab_size=tokenizer.vocab_size)
    model = LoopedGPT.from_config(config, seed=0)
    with torch.no_grad():
        for p in model.parameters():  # init_weights zeroes projections: make them non-zero
            p.add_(torch.randn_like(p) * 0.02)
    run = folder / "stand-in"
    save_model(run / "checkpoints" / "step_000001", model)
    tokenizer.save(run / "tokenizer")
    return run


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(run: Path, threads: int, max_batch: int, max_queue: int) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": str(threads),
           "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.Popen([sys.executable, "-m", "loopedlm", "serve", str(run), "--port",
                             str(port), "--max-batch", str(max_batch), "--max-queue",
                             str(max_queue)], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited: {proc.stderr.read()[-2000:]}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        time.sleep(0.3)
    proc.kill()
    raise RuntimeError("the server did not start within 300 s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", type=Path, default=None, help="run folder (default: stand-in)")
    parser.add_argument("--url", default=None, help="a running server (skips starting one)")
    parser.add_argument("--threads", type=int, default=1, help="the server's torch threads")
    parser.add_argument("--max-batch", type=int, default=16)
    parser.add_argument("--clients", default="1,16", help="concurrency levels to measure")
    parser.add_argument("--requests", type=int, default=4, help="requests per client (scaling)")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--n-loops", type=int, default=None, help="default: the model's")
    parser.add_argument("--load-clients", type=int, default=64)
    parser.add_argument("--load-requests", type=int, default=20)
    parser.add_argument("--load-max-tokens", type=int, default=16)
    parser.add_argument("--skip-load", action="store_true")
    parser.add_argument("--skip-scaling", action="store_true")
    args = parser.parse_args()

    proc = None
    with tempfile.TemporaryDirectory() as tmp:
        url = args.url
        if url is None:
            run = args.run or stand_in_run(Path(tmp))
            proc, url = start_server(run, args.threads, args.max_batch,
                                     max_queue=max(256, args.load_clients * 2))
            print(f"server: loopedlm serve {run} ({args.threads} torch threads, "
                  f"--max-batch {args.max_batch})")
        try:
            card = httpx.get(f"{url}/v1/models").json()["data"][0]
            print(f"model {card['id']}: {card['loop_mode']}, {card['n_loops']} loops by default")
            if not args.skip_scaling:
                base = None
                for clients in [int(c) for c in args.clients.split(",")]:
                    s = scaling(url, clients, args.requests, args.max_tokens, args.n_loops)
                    base = base or s["tokens_per_s"]
                    print(f"{clients:3d} clients x {args.requests} requests x {args.max_tokens} "
                          f"tokens: {s['tokens_per_s']:7.1f} tokens/s "
                          f"({s['tokens_per_s'] / base:4.1f}x one client), latency p50 "
                          f"{s['p50_s']:.2f}s p99 {s['p99_s']:.2f}s, first token p50 "
                          f"{s['ttft_p50_s']:.3f}s")
            if not args.skip_load:
                s = load_test(url, args.load_clients, args.load_requests, args.load_max_tokens)
                print(f"load test: {args.load_clients} streaming clients x {args.load_requests} "
                      f"requests x {args.load_max_tokens} tokens: all {s['requests']} answered "
                      f"once, each with its own text; {s['tokens_per_s']:.1f} tokens/s, latency "
                      f"p50 {s['p50_s']:.2f}s p99 {s['p99_s']:.2f}s, {s['wall_s']:.1f}s in all")
            metrics = httpx.get(f"{url}/metrics").text
            print("server metrics: " + ", ".join(
                line for line in metrics.splitlines()
                if line.startswith(("loopedlm_generated_tokens_total",
                                    "loopedlm_decode_steps_total",
                                    "loopedlm_loops_spent_total"))))
        finally:
            if proc is not None:
                proc.terminate()
                proc.wait(timeout=60)


if __name__ == "__main__":
    main()
