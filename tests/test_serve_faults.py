"""`loopedlm serve` when things go wrong (issue 22): nothing a request does can hurt the
next one. A failing engine step ends only the request that joined it, /health tells a
server that cannot generate from one that can, a big prompt is tokenized without holding
up anyone else, and the limits (body size, prompts per request, fields this server does
not implement) answer 4xx. Also the fields OpenAI clients use that a tiny test server
implements since then: logprobs and echo (D11). Faults are injected through the public
seams: an engine subclass, a tokenizer wrapper."""

from __future__ import annotations

import json
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx2")

from serve_helpers import (  # noqa: E402
    SlowEngine,
    load_tiny_run,
    reference,
    save_tiny_run,
    start,
    wait_until,
)

import loopedlm.infer.scheduler as scheduler_module  # noqa: E402
from loopedlm.infer.server import UNSUPPORTED  # noqa: E402

POISON = 7  # a prompt holding this token id makes FaultyEngine's steps fail


@pytest.fixture(scope="module")
def model_and_tokenizer(tmp_path_factory):
    return load_tiny_run(save_tiny_run(tmp_path_factory.mktemp("serve_faults")))


class Fatal(BaseException):
    """An exception the decode worker cannot survive (as a fatal device error)."""


class FaultyEngine(SlowEngine):
    """A decode engine whose steps fail while a sequence whose prompt holds POISON is in the
    batch, or always while `broken`; `fatal` raises what kills the worker."""

    def __init__(self, model, delay: float = 0.0, **options):
        super().__init__(model, delay, **options)
        self.poisoned: set[int] = set()
        self.broken = self.fatal = False

    def add(self, slot, prompt_ids, params=None):
        first = super().add(slot, prompt_ids, params)
        if POISON in list(prompt_ids):
            self.poisoned.add(slot)
        return first

    def add_many(self, requests):
        errors = super().add_many(requests)
        self.poisoned |= {slot for (slot, ids, _), error in zip(requests, errors, strict=True)
                          if error is None and POISON in list(ids)}
        return errors

    def release(self, slot):
        self.poisoned.discard(slot)
        super().release(slot)

    def step(self):
        self.gate.wait()
        if self.fatal:
            raise Fatal("the device is gone")
        if self.broken or self.poisoned:
            raise RuntimeError("injected step failure")
        return super().step()


def post(url, body, **kwargs):
    return httpx.post(f"{url}/v1/completions", json=body, timeout=60, **kwargs)


def metric(url: str, name: str) -> float:
    lines = [line for line in httpx.get(f"{url}/metrics").text.splitlines()
             if line.startswith(name + " ")]
    return float(lines[0].split()[-1])


GREEDY = {"prompt": "To be", "max_tokens": 12, "temperature": 0, "n_loops": 2}


# ---- a failure inside the engine -----------------------------------------------------------
def test_a_step_failing_on_a_joining_request_fails_only_that_request(model_and_tokenizer):
    """Issue 22 (after D1): a failing step ends the request that joined it; the other
    request in the batch gets its exact text, the next one too, and no slot is left held."""
    _, tokenizer = model_and_tokenizer
    expected = reference(model_and_tokenizer, "To be", n_loops=2, max_tokens=12, temperature=0)
    assert len(expected.tokens[0]) >= 3  # still running when the poisoned request joins
    server, engine = start(model_and_tokenizer, engine_class=FaultyEngine)
    engine.gate.clear()  # the first request holds its first step until the second waits
    with server as url, ThreadPoolExecutor(2) as pool:
        first = pool.submit(post, url, GREEDY)
        wait_until(lambda: httpx.get(f"{url}/health").json()["batch_size"] == 1)
        poisoned = pool.submit(post, url, {"prompt": [tokenizer.bos_id, POISON, 3],
                                           "max_tokens": 4})
        wait_until(lambda: httpx.get(f"{url}/health").json()["queue_length"] == 1)
        engine.gate.set()
        assert poisoned.result().status_code == 500
        assert "generation failed" in poisoned.result().json()["error"]["message"]
        assert first.result().status_code == 200
        assert first.result().json()["choices"][0]["text"] == expected.texts[0]
        assert metric(url, "loopedlm_failed_decode_steps_total") == 1
        health = httpx.get(f"{url}/health")
        assert health.status_code == 200 and health.json()["status"] == "ok"
        again = post(url, GREEDY)
        assert again.status_code == 200 and again.json()["choices"][0]["text"] == expected.texts[0]
        assert engine.active_slots == []  # every slot was given back


class RefusingEngine(SlowEngine):
    """A decode engine whose `add_many` refuses a sequence whose prompt holds POISON (sent to
    a slot that does not exist) and counts the requests of each call."""

    def __init__(self, model, delay: float = 0.0, **options):
        super().__init__(model, delay, **options)
        self.calls: list[int] = []

    def add_many(self, requests):
        self.calls.append(len(requests))
        return super().add_many([(self.max_batch if POISON in list(ids) else slot, ids, params)
                                 for slot, ids, params in requests])


def test_requests_admitted_together_are_prefilled_together_and_a_refused_one_ends_alone(
        model_and_tokenizer):
    """Requests that wait while a step runs are admitted together and prefilled in one
    `add_many`; one the engine refuses gets a 500 while the others get their exact text."""
    _, tokenizer = model_and_tokenizer
    expected = reference(model_and_tokenizer, "To be", n_loops=2, max_tokens=12, temperature=0)
    server, engine = start(model_and_tokenizer, engine_class=RefusingEngine)
    engine.gate.clear()
    with server as url, ThreadPoolExecutor(4) as pool:
        first = pool.submit(post, url, GREEDY)
        wait_until(lambda: httpx.get(f"{url}/health").json()["batch_size"] == 1)
        later = [pool.submit(post, url, GREEDY),
                 pool.submit(post, url, {"prompt": [tokenizer.bos_id, POISON, 3],
                                         "max_tokens": 4}),
                 pool.submit(post, url, GREEDY)]
        wait_until(lambda: httpx.get(f"{url}/health").json()["queue_length"] == 3)
        engine.gate.set()
        assert later[1].result().status_code == 500
        for response in (first.result(), later[0].result(), later[2].result()):
            assert response.status_code == 200
            assert response.json()["choices"][0]["text"] == expected.texts[0]
    assert engine.calls == [3]
    assert engine.active_slots == []


def test_health_is_503_while_the_engine_cannot_generate_and_ok_once_it_can(
        model_and_tokenizer, monkeypatch):
    """Issue 22 (D1 left /health "ok" on a broken server): /health is the engine's state."""
    monkeypatch.setattr(scheduler_module, "CHECK_EVERY", 0.05)  # the canary's period
    expected = reference(model_and_tokenizer, "To be", n_loops=2, max_tokens=12, temperature=0)
    server, engine = start(model_and_tokenizer, engine_class=FaultyEngine)
    with server as url:
        assert httpx.get(f"{url}/health").status_code == 200
        engine.broken = True
        assert post(url, GREEDY).status_code == 500
        health = httpx.get(f"{url}/health")
        assert health.status_code == 503 and health.json()["status"] == "error"
        assert "injected step failure" in health.json()["error"]
        assert metric(url, "loopedlm_healthy") == 0
        engine.broken = False  # the canary sees it work again, with no request needed
        wait_until(lambda: httpx.get(f"{url}/health").status_code == 200)
        r = post(url, GREEDY)
        assert r.status_code == 200 and r.json()["choices"][0]["text"] == expected.texts[0]


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_dead_decode_worker_makes_health_and_new_requests_503(model_and_tokenizer):
    server, engine = start(model_and_tokenizer, engine_class=FaultyEngine)
    with server as url:
        engine.fatal = True
        assert post(url, GREEDY).status_code == 500  # the request it held ends, answered
        health = httpx.get(f"{url}/health")
        assert health.status_code == 503 and "not running" in health.json()["error"]
        r = post(url, GREEDY)
        assert r.status_code == 503 and "not running" in r.json()["error"]["message"]


# ---- a big prompt does not hold up anyone else ------------------------------------------------
class BlockingTokenizer:
    """The served tokenizer, but encoding a text that holds "BLOCK" waits for `release`."""

    def __init__(self, inner):
        self.inner, self.entered, self.release = inner, threading.Event(), threading.Event()

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def encode(self, text: str) -> list[int]:
        if "BLOCK" in text:
            self.entered.set()
            assert self.release.wait(60)
        return self.inner.encode(text)


def test_tokenizing_runs_off_the_event_loop(model_and_tokenizer):
    """D5: while one prompt is being tokenized, /health and other requests (streamed) are
    answered."""
    tokenizer = BlockingTokenizer(model_and_tokenizer[1])
    expected = reference(model_and_tokenizer, "To be", n_loops=2, max_tokens=12, temperature=0)
    server, _ = start(model_and_tokenizer, tokenizer=tokenizer)
    with server as url, ThreadPoolExecutor(1) as pool:
        blocked = pool.submit(post, url, {**GREEDY, "prompt": "BLOCK the loop"})
        assert tokenizer.entered.wait(60)
        assert httpx.get(f"{url}/health", timeout=30).status_code == 200
        with httpx.stream("POST", f"{url}/v1/completions", json={**GREEDY, "stream": True},
                          timeout=30) as r:
            events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
        text = "".join(json.loads(e)["choices"][0]["text"] for e in events[:-1])
        assert text == expected.texts[0] and not blocked.done()
        tokenizer.release.set()
        assert blocked.result().status_code == 200


# ---- limits -------------------------------------------------------------------------------------
def test_a_body_over_the_limit_gets_413_before_it_is_read_whole(model_and_tokenizer):
    """D5: there was no limit on the request size."""
    server, _ = start(model_and_tokenizer, max_body_bytes=2000)
    big = json.dumps({"prompt": "To be " * 500, "max_tokens": 2}).encode()
    headers = {"content-type": "application/json"}
    with server as url:
        r = httpx.post(f"{url}/v1/completions", content=big, headers=headers)
        assert r.status_code == 413 and "--max-body-bytes" in r.json()["error"]["message"]
        assert f"{len(big)} bytes" in r.json()["error"]["message"]
        # no Content-Length (chunked): cut off once past the limit
        r = httpx.post(f"{url}/v1/completions", content=iter([big[:1500], big[1500:]]),
                       headers=headers)
        assert r.status_code == 413 and "more than 2000 bytes" in r.json()["error"]["message"]
        # a body far beyond what the sockets buffer: the server reads the rest before it
        # answers, so the client, still sending, gets the 413 and not a reset connection
        huge = json.dumps({"prompt": "To be " * 400_000}).encode()
        for content in (huge, iter([huge[:1500], huge[1500:]])):
            r = httpx.post(f"{url}/v1/completions", content=content, headers=headers)
            assert r.status_code == 413
        chunked_ok = json.dumps({"prompt": "To be", "max_tokens": 2}).encode()
        r = httpx.post(f"{url}/v1/completions", content=iter([chunked_ok[:5], chunked_ok[5:]]),
                       headers=headers)
        assert r.status_code == 200
        assert 'loopedlm_requests_total{status="413"} 4.0' in httpx.get(f"{url}/metrics").text


def test_too_many_prompts_get_a_400_naming_the_limit(model_and_tokenizer):
    server, _ = start(model_and_tokenizer, max_prompts=3)
    with server as url:
        r = post(url, {"prompt": ["a", "b", "c", "d"], "max_tokens": 1})
        assert r.status_code == 400 and "at most 3 per request (--max-prompts)" in r.text
        assert post(url, {"prompt": ["a", "b", "c"], "max_tokens": 1}).status_code == 200


UNSUPPORTED_VALUES = {"suffix": "!", "best_of": 2, "frequency_penalty": 0.5,
                      "presence_penalty": -1, "logit_bias": {"5": 100}}


def test_fields_this_server_does_not_implement_get_a_400_naming_them(model_and_tokenizer):
    """D11: fields accepted and silently ignored are now a 400 naming them."""
    assert set(UNSUPPORTED_VALUES) == set(UNSUPPORTED)
    server, _ = start(model_and_tokenizer)
    with server as url:
        for name, value in UNSUPPORTED_VALUES.items():
            r = post(url, {"prompt": "To", "max_tokens": 1, name: value})
            assert r.status_code == 400, name
            assert r.json()["error"]["param"] == name and "not supported" in r.text
        neutral = {name: values[-1] for name, values in UNSUPPORTED.items()}
        assert post(url, {"prompt": "To", "max_tokens": 1, **neutral}).status_code == 200
        r = post(url, {"prompt": "To", "max_tokens": 1, "echo": True, "logprobs": 1})
        assert r.status_code == 400 and r.json()["error"]["param"] == "echo"
        assert post(url, {"prompt": "To", "logprobs": 6}).status_code == 400


# ---- logprobs and echo (D11) ---------------------------------------------------------------------
@torch.no_grad()
def test_logprobs_are_the_models_and_stream_as_they_come(model_and_tokenizer):
    """D11: logprobs were accepted and ignored (null); now OpenAI's, from the model, with
    self-speculative decoding (draft_loops) too."""
    model, tokenizer = model_and_tokenizer
    expected = reference(model_and_tokenizer, "To be", n_loops=2, max_tokens=12, temperature=0)
    prompt = [tokenizer.bos_id, *tokenizer.encode("To be")]
    full = model(torch.tensor([prompt + expected.tokens[0]]), n_loops=2)[0].float()
    logp = full.log_softmax(-1)
    server, _ = start(model_and_tokenizer)
    with server as url:
        r = post(url, {**GREEDY, "logprobs": 2}).json()
        # self-speculative decoding reports the same (the verify pass's, at n_loops)
        speculative = post(url, {**GREEDY, "logprobs": 2, "draft_loops": 1}).json()
        with httpx.stream("POST", f"{url}/v1/completions", timeout=60,
                          json={**GREEDY, "logprobs": 2, "stream": True}) as s:
            events = [json.loads(line[6:]) for line in s.iter_lines()
                      if line.startswith("data: ") and line != "data: [DONE]"]
    choice = r["choices"][0]
    got = choice["logprobs"]
    n = len(expected.tokens[0])
    assert choice["text"] == expected.texts[0] and len(got["tokens"]) == n
    assert got["tokens"] == [tokenizer.decode([t]) for t in expected.tokens[0]]
    for i, token in enumerate(expected.tokens[0]):
        row = logp[len(prompt) - 1 + i]
        assert got["token_logprobs"][i] == pytest.approx(row[token].item(), abs=1e-4)
        values, best = row.topk(2)
        top = {tokenizer.decode([t]): v for t, v in zip(best.tolist(), values.tolist(),
                                                       strict=True)}
        assert got["top_logprobs"][i] == pytest.approx(top, abs=1e-4)  # greedy: chosen is top
    offsets = got["text_offset"]
    assert offsets == sorted(offsets) and offsets[0] == 0 and offsets[-1] <= len(choice["text"])
    streamed = {key: [v for e in events for v in e["choices"][0]["logprobs"][key]]
                for key in got}
    assert streamed == got
    drafted = speculative["choices"][0]
    assert drafted["text"] == choice["text"] and drafted["logprobs"]["tokens"] == got["tokens"]
    assert drafted["logprobs"]["token_logprobs"] == pytest.approx(got["token_logprobs"], abs=1e-4)
    for mine, theirs in zip(drafted["logprobs"]["top_logprobs"], got["top_logprobs"], strict=True):
        assert mine == pytest.approx(theirs, abs=1e-4)


def test_echo_puts_the_prompt_before_the_completion(model_and_tokenizer):
    _, tokenizer = model_and_tokenizer
    expected = reference(model_and_tokenizer, "To be", n_loops=2, max_tokens=12, temperature=0)
    server, _ = start(model_and_tokenizer)
    with server as url:
        r = post(url, {**GREEDY, "echo": True})
        assert r.json()["choices"][0]["text"] == "To be" + expected.texts[0]
        with httpx.stream("POST", f"{url}/v1/completions", timeout=60,
                          json={**GREEDY, "echo": True, "stream": True}) as s:
            events = [json.loads(line[6:]) for line in s.iter_lines()
                      if line.startswith("data: ") and line != "data: [DONE]"]
        assert "".join(e["choices"][0]["text"] for e in events) == "To be" + expected.texts[0]
        ids = [tokenizer.bos_id, *tokenizer.encode("To be")]
        r = post(url, {**GREEDY, "prompt": ids, "echo": True})
        assert r.json()["choices"][0]["text"] == tokenizer.decode(ids) + expected.texts[0]


def test_a_prompt_too_long_to_fit_is_refused_before_it_is_tokenized(model_and_tokenizer):
    """D5: a 10 MB prompt was refused only after seconds of tokenizing."""
    tokenizer = BlockingTokenizer(model_and_tokenizer[1])
    server, _ = start(model_and_tokenizer, tokenizer=tokenizer)
    with server as url:
        r = post(url, {"prompt": "BLOCK " * 50_000, "max_tokens": 1})
        assert r.status_code == 400 and "300000 characters, so at least" in r.text
        assert r.json()["error"]["code"] == "context_length_exceeded"
        assert not tokenizer.entered.is_set()


# ---- the port (D9) ---------------------------------------------------------------------------------
def test_a_port_in_use_fails_before_anything_loads_or_is_announced(tmp_path, caplog):
    """D9: the port is taken first (here the run does not even exist), and nothing says
    "serving ... on http://..." before the error."""
    import logging
    import socket

    from loopedlm.infer.server import CannotListen, ServeConfig, serve

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with caplog.at_level(logging.INFO), pytest.raises(CannotListen, match="port is in use"):
            serve(str(tmp_path / "no_such_run"), ServeConfig(port=port))
    assert not any("serving" in record.getMessage() for record in caplog.records)
