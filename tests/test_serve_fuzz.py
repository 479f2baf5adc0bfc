"""Property-based fuzzing of `loopedlm serve`'s HTTP API (issue 22): arbitrary bodies sent
to ONE live server, which must answer each with 200 or 4xx, never 5xx, and take no lasting
damage: after every request a normal greedy request still returns its exact text and
/health answers 200, while background clients stream greedy completions (checked exact
too).

Bodies: JSON objects whose fields (every field of the API, in any combination, and unknown
ones) take valid values, huge, tiny, non-finite and negative numbers, wrong types, nested
junk, long lists and strings (lone surrogates included, escaped or as raw bytes that are not
UTF-8); also truncated and random bytes, other JSON values, and bodies over the size limit.

The default tier runs LOOPEDLM_FUZZ_EXAMPLES examples (default 60); benchmarks/nightly.sh
runs 2,500 with 4 background clients and prints the summary line (requests, failures,
slowest /health).
"""

from __future__ import annotations

import json
import math
import os
import threading
import time
from collections import Counter

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx2")

from serve_helpers import load_tiny_run, reference, save_tiny_run, start  # noqa: E402

EXAMPLES = int(os.environ.get("LOOPEDLM_FUZZ_EXAMPLES", "60"))
LOAD_CLIENTS = int(os.environ.get("LOOPEDLM_FUZZ_LOAD", "1"))
MAX_BODY = 64 * 1024
GREEDY = {"prompt": "To be", "max_tokens": 8, "temperature": 0, "n_loops": 2, "seed": 1}
STREAMED = {"prompt": "or not", "max_tokens": 6, "temperature": 0, "n_loops": 3,
            "seed": 1, "stream": True}

# ---- strategies ----------------------------------------------------------------------------------
surrogates = st.integers(0xD800, 0xDFFF).map(chr)
texts = st.one_of(
    st.text(max_size=20),
    st.text(alphabet=st.one_of(st.characters(), surrogates), max_size=20),
    st.sampled_from(["", " ", "To be", "\x00", "\ufffd", "<|bos|>", "\U0001f600" * 3]),
    st.integers(0, 3 * MAX_BODY // 2).map(lambda n: "x" * n),  # past the body limit too
)
numbers = st.one_of(
    st.integers(-3, 60),
    st.integers(min_value=-(2**80), max_value=2**80),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0, 1, -1, 0.5, 1e-300, 5e-324, -0.0, 3.5e38, 1e39, 1.7976931348623157e308,
                     2**31, 2**63 - 1, 2**63, 2**64, 4, 5, 6, 7]),
)
scalars = st.one_of(st.none(), st.booleans(), numbers, texts)
junk = st.recursive(scalars, lambda inner: st.lists(inner, max_size=6)
                    | st.dictionaries(st.text(max_size=6), inner, max_size=4), max_leaves=12)
token_ids = st.integers(-3, 320)
prompts = st.one_of(
    texts,
    st.lists(texts, max_size=40),
    st.lists(token_ids, min_size=0, max_size=60),
    st.lists(st.lists(token_ids, max_size=10), max_size=6),
    st.lists(st.one_of(texts, st.lists(token_ids, max_size=5)), max_size=5),
    st.lists(st.just("a"), min_size=30, max_size=300),
    junk,
)


valid_texts = st.text(st.characters(codec="utf-8"), max_size=12)
VALID = {
    "model": st.just("tinyrun"),
    "prompt": st.one_of(valid_texts, st.lists(valid_texts, min_size=1, max_size=3),
                        st.lists(st.integers(0, 297), min_size=1, max_size=12)),
    "max_tokens": st.integers(1, 40),
    "temperature": st.sampled_from([0, 0.7, 1.0, 2.5]),
    "top_p": st.floats(0.05, 1.0),
    "seed": st.integers(-(2**63), 2**63 - 1),
    "stop": st.one_of(valid_texts.filter(bool), st.lists(valid_texts.filter(bool), max_size=4)),
    "stream": st.booleans(),
    "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}),
    "n": st.just(1),
    "logprobs": st.integers(0, 5),
    "echo": st.booleans(),
    "user": valid_texts,
    "suffix": st.none(),
    "best_of": st.just(1),
    "frequency_penalty": st.just(0),
    "presence_penalty": st.just(0),
    "logit_bias": st.just({}),
    "n_loops": st.integers(1, 6),
    "adaptive_threshold": st.floats(0, 2),
    "adaptive_criterion": st.sampled_from(["state", "kl", "kl_previous", "gate"]),
    "draft_loops": st.integers(1, 5),
    "return_loops": st.booleans(),
    "timeout": st.floats(1e-3, 30),
}
anything = st.one_of(numbers, texts, junk)
unknown_fields = st.dictionaries(st.text(max_size=10), junk, max_size=2)
valid_objects = st.fixed_dictionaries({"prompt": VALID["prompt"]},
                                      optional={k: v for k, v in VALID.items() if k != "prompt"})


@st.composite
def one_field_bad(draw) -> dict:
    """A valid request with one field (maybe the prompt) set to anything."""
    value = draw(valid_objects)
    value[draw(st.sampled_from(sorted(VALID)))] = draw(st.one_of(anything, prompts))
    return value


objects = st.one_of(
    valid_objects, one_field_bad(),
    st.builds(lambda known, extra: {**extra, **known},
              st.fixed_dictionaries({}, optional={k: st.one_of(v, anything)
                                                  for k, v in VALID.items()}),
              unknown_fields))


@st.composite
def bodies(draw) -> tuple[bytes, str]:
    """(the request body, its content type)."""
    value = draw(st.one_of(objects, objects, objects, junk))
    raw = draw(st.booleans())  # non-ASCII (lone surrogates: invalid UTF-8) unescaped
    text = json.dumps(value, allow_nan=True, ensure_ascii=not raw)
    body = text.encode("utf-8", "surrogatepass")
    damage = draw(st.sampled_from(["none"] * 6 + ["truncate", "bytes", "random"]))
    if damage == "truncate":
        body = body[:draw(st.integers(0, len(body)))]
    elif damage == "bytes":
        at = draw(st.integers(0, len(body)))
        body = body[:at] + draw(st.binary(min_size=1, max_size=8)) + body[at:]
    elif damage == "random":
        body = draw(st.binary(max_size=200))
    content_type = draw(st.sampled_from(["application/json"] * 8 + ["text/plain", ""]))
    return body, content_type


# ---- the server -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def model_and_tokenizer(tmp_path_factory):
    return load_tiny_run(save_tiny_run(tmp_path_factory.mktemp("serve_fuzz")))


class Background:
    """`clients` threads streaming a greedy completion over and over, each checked exact."""

    def __init__(self, url: str, expected: str, clients: int):
        self.url, self.expected, self.stop = url, expected, threading.Event()
        self.requests, self.failures = 0, []
        self.threads = [threading.Thread(target=self.run, daemon=True) for _ in range(clients)]

    def run(self) -> None:
        with httpx.Client(timeout=120) as client:
            while not self.stop.is_set():
                with client.stream("POST", f"{self.url}/v1/completions", json=STREAMED) as r:
                    lines = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
                text = "".join(json.loads(e)["choices"][0]["text"] for e in lines[:-1])
                self.requests += 1
                if r.status_code != 200 or text != self.expected:
                    self.failures.append((r.status_code, text))

    def start(self) -> Background:
        for thread in self.threads:
            thread.start()
        return self

    def finish(self) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(timeout=120)


def answer(client, body: bytes, content_type: str) -> tuple[int, bytes]:
    """(status, whole body): a stream is read to its end."""
    headers = {"content-type": content_type} if content_type else {}
    with client.stream("POST", "/v1/completions", content=body, headers=headers) as r:
        return r.status_code, r.read()


def check_answer(status: int, content: bytes) -> None:
    """200 or 4xx, and a body a client can read: JSON, or server-sent events of JSON."""
    assert status < 500, (status, content[:300])
    if content.startswith(b"data: "):
        events = [line[6:] for line in content.decode().split("\n\n") if line]
        assert events[-1] == "[DONE]"
        for event in events[:-1]:
            json.loads(event)
    else:
        reply = json.loads(content)
        assert ("error" in reply) == (status != 200), reply


def test_fuzzed_requests_never_get_a_5xx_nor_hurt_the_next_request(model_and_tokenizer):
    expected = reference(model_and_tokenizer, GREEDY["prompt"], n_loops=2, max_tokens=8,
                         temperature=0).texts[0]
    streamed = reference(model_and_tokenizer, STREAMED["prompt"], n_loops=3, max_tokens=6,
                         temperature=0).texts[0]
    server, _ = start(model_and_tokenizer, max_body_bytes=MAX_BODY, max_batch=4, timeout=30)
    stats = {"requests": 0, "health": [], "status": Counter()}
    with server as url, httpx.Client(base_url=url, timeout=120) as client:
        idle = []  # the baseline: /health of the idle server
        for _ in range(20):
            began = time.perf_counter()
            assert client.get("/health").status_code == 200
            idle.append(time.perf_counter() - began)
        load = Background(url, streamed, LOAD_CLIENTS).start()

        @settings(max_examples=EXAMPLES, deadline=None, database=None,
                  suppress_health_check=list(HealthCheck))
        @given(bodies())
        def one_request(case):
            status, content = answer(client, *case)
            stats["requests"] += 1
            stats["status"][status] += 1
            check_answer(status, content)
            greedy = client.post("/v1/completions", json=GREEDY)  # the next request is fine
            assert greedy.status_code == 200 and greedy.json()["choices"][0]["text"] == expected
            began = time.perf_counter()
            health = client.get("/health")
            stats["health"].append(time.perf_counter() - began)
            if stats["health"][-1] == max(stats["health"]):
                stats["slowest_after"] = (status, len(case[0]), case[0][:80])
            assert health.status_code == 200, health.text

        try:
            one_request()
        finally:
            load.finish()
        metrics = client.get("/metrics").text
    slowest = max(stats["health"])
    median = sorted(stats["health"])[len(stats["health"]) // 2]
    print(f"\nfuzz: {stats['requests']} fuzzed requests against one server (and as many greedy "
          f"checks and /health calls), {load.requests} background streams from "
          f"{LOAD_CLIENTS} clients; failures: {len(load.failures)} background; /health "
          f"slowest {slowest * 1000:.1f} ms, median {median * 1000:.1f} ms (idle: slowest "
          f"{max(idle) * 1000:.1f} ms, median {sorted(idle)[10] * 1000:.1f} ms); statuses "
          f"{dict(sorted(stats['status'].items()))}; the slowest /health came after "
          f"(status, body bytes, body) {stats['slowest_after']}")
    assert not load.failures, load.failures[:3]
    assert 'status="5' not in metrics
    assert math.isfinite(slowest)
