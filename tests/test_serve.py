"""`loopedlm serve` (issue 12): the scheduler over the decode engine and the HTTP server,
driven by the real `openai` client against a live server on 127.0.0.1."""

from __future__ import annotations

import json
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx2")  # the HTTP client the openai package uses
openai = pytest.importorskip("openai")

from serve_helpers import (  # noqa: E402
    TEXTS,
    load_tiny_run,
    make_model,
    reference,
    save_tiny_run,
    start,
    wait_until,
)

from loopedlm.infer.engine import AdaptiveLoops, DecodeEngine, SequenceParams  # noqa: E402
from loopedlm.infer.generate import generate  # noqa: E402
from loopedlm.infer.sampling import SamplingParams  # noqa: E402
from loopedlm.infer.scheduler import Scheduler, Sequence, find_stop, safe_length  # noqa: E402


# ---- fixtures ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A tiny random FLT saved as a run (checkpoint + tokenizer), as `loopedlm serve` reads it."""
    return save_tiny_run(tmp_path_factory.mktemp("serve"))


@pytest.fixture(scope="module")
def model_and_tokenizer(run_dir):
    return load_tiny_run(run_dir)


# ---- the scheduler over the engine ------------------------------------------------------------
class ByteTokenizer:
    """One token per byte (what the scheduler needs of a tokenizer: decode)."""

    bos_id = 60

    def decode(self, ids) -> str:
        return bytes(i for i in ids if i < 60).decode("latin-1")


def run_scheduler(engine, jobs, submit_every: int = 1):
    """Submit `jobs` [(prompt, SequenceParams, max_tokens)], one more every `submit_every`
    steps, to a Scheduler over `engine`; the (tokens, loops) each finished with."""
    scheduler = Scheduler(engine, ByteTokenizer(), max_queue=len(jobs))
    done, finished = threading.Event(), []

    def sink(delta):  # (called on the scheduler's thread)
        if delta.finish_reason is not None:
            finished.append(delta)
            if len(finished) == len(jobs):
                done.set()
    sequences = [Sequence(prompt=p, params=params, max_tokens=n, sink=sink,
                          stop_ids=frozenset({ByteTokenizer.bos_id}))
                 for p, params, n in jobs]
    scheduler.start()
    try:
        for i in range(0, len(sequences), submit_every):
            scheduler.submit(sequences[i:i + submit_every])
            time.sleep(0.01)
        assert done.wait(60), "the scheduler did not finish every sequence"
    finally:
        scheduler.close()
    return [(s.tokens, s.loops, s.finish_reason) for s in sequences]


@pytest.mark.parametrize("mode", ["flt", "lt", "ltai"])
@torch.no_grad()
def test_scheduled_sequences_with_joins_leaves_and_mixed_loops_equal_generate_alone(mode):
    """Through the scheduler's protocol, sequences join and leave between steps, with
    different loop counts (some adaptive), until some fill the context: each equals
    generate() of its prompt alone."""
    model = make_model(mode, window_pattern="SL", sequence_len=16)
    engine = DecodeEngine(model, max_batch=3, max_loops=4)
    rng = random.Random(mode)
    jobs = [([rng.randrange(50) for _ in range(rng.randint(1, 9))], rng.randint(1, 4),
             rng.choice([None, 0.3]), rng.randint(2, 10)) for _ in range(6)]
    results = run_scheduler(engine, [
        (prompt, SequenceParams(n_loops=n_loops, sampling=SamplingParams(temperature=0),
                                adaptive=None if th is None else AdaptiveLoops(th)), n)
        for prompt, n_loops, th, n in jobs])
    for (prompt, n_loops, threshold, max_tokens), (tokens, loops, _) in zip(jobs, results,
                                                                         strict=True):
        alone = generate(model, prompt, n_loops=n_loops, max_tokens=max_tokens, temperature=0,
                         adaptive_threshold=threshold, stop=ByteTokenizer.bos_id)
        assert tokens == alone.tokens[0], (prompt, n_loops)
        assert loops == alone.loops[0]


def test_the_engine_rejects_what_does_not_fit():
    engine = DecodeEngine(make_model("flt", sequence_len=8), max_batch=1, max_loops=3)
    with pytest.raises(ValueError, match="n_loops=4"):
        engine.add(0, [1, 2], SequenceParams(n_loops=4))
    with pytest.raises(ValueError, match="9"):
        engine.add(0, list(range(9)), SequenceParams(n_loops=2))
    with pytest.raises(ValueError, match="temperature=1e"):  # issue 22, D1
        SequenceParams(n_loops=2, sampling=SamplingParams(temperature=1e39))
    engine.add(0, [1], SequenceParams(n_loops=2))  # the failed adds left slot 0 free
    with pytest.raises(ValueError, match="slot 1"):
        engine.add(1, [1], SequenceParams(n_loops=2))
    with pytest.raises(ValueError, match="max_batch=0"):
        DecodeEngine(make_model("flt"), max_batch=0, max_loops=3)


# ---- text: stop strings and incremental deltas -----------------------------------------------
def test_stop_strings_and_held_back_text():
    assert find_stop("abc END x", ("END",), 0) == 4
    assert find_stop("abc EN", ("END",), 0) is None
    assert find_stop("xx\n\nyy", ("\n\n", "yy"), 2) == 2
    # a tail that may begin a stop string, or an incomplete UTF-8 character, is held back
    assert safe_length("hello E", ("END",)) == len("hello ")
    assert safe_length("hello EN", ("END", "NO")) == len("hello ")
    assert safe_length("hello \ufffd", ()) == len("hello ")
    assert safe_length("hello \ufffd", (), hold_incomplete=False) == len("hello \ufffd")
    assert safe_length("hello", ("END",)) == 5


# ---- the server with the openai client ---------------------------------------------------------
def test_openai_client_completions_streaming_and_loop_fields(model_and_tokenizer):
    _, tokenizer = model_and_tokenizer
    server, _ = start(model_and_tokenizer)
    with server as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        assert [m.id for m in client.models.list().data] == ["tinyrun"]
        expected = reference(model_and_tokenizer, "To be", n_loops=2, max_tokens=6,
                             temperature=0)
        r = client.completions.create(model="tinyrun", prompt="To be", max_tokens=6,
                                      temperature=0, extra_body={"n_loops": 2,
                                                                 "return_loops": True})
        choice = r.model_dump()["choices"][0]
        assert choice["text"] == expected.texts[0]
        assert choice["loops"] == expected.loops[0] == [2] * len(expected.tokens[0])
        assert choice["mean_loops"] == 2.0
        assert r.usage.prompt_tokens == 1 + len(tokenizer.encode("To be"))
        assert r.usage.completion_tokens == len(expected.tokens[0])

        chunks = list(client.completions.create(
            model="tinyrun", prompt="To be", max_tokens=6, temperature=0, stream=True,
            stream_options={"include_usage": True}, extra_body={"n_loops": 2}))
        text = "".join(c.choices[0].text for c in chunks if c.choices)
        assert text == expected.texts[0]
        finals = [c.choices[0] for c in chunks if c.choices and c.choices[0].finish_reason]
        assert len(finals) == 1 and finals[0].finish_reason == expected.finish_reasons[0]
        assert chunks[-1].usage.completion_tokens == len(expected.tokens[0])

        # adaptive loops: the loops each token used, as generate() reports them
        adaptive = reference(model_and_tokenizer, "or not", n_loops=5, max_tokens=8,
                             temperature=0, adaptive_threshold=0.4)
        r = client.completions.create(model="tinyrun", prompt="or not", max_tokens=8,
                                      temperature=0, extra_body={
                                          "n_loops": 5, "adaptive_threshold": 0.4,
                                          "return_loops": True})
        choice = r.model_dump()["choices"][0]
        assert choice["text"] == adaptive.texts[0] and choice["loops"] == adaptive.loops[0]
        assert choice["mean_loops"] == pytest.approx(adaptive.mean_loops)
        # ... and with the prompt's tokens stopping by the same rule
        adaptive = reference(model_and_tokenizer, "or not", n_loops=5, max_tokens=8,
                             temperature=0, adaptive_threshold=0.4, adaptive_prompt=True)
        r = client.completions.create(model="tinyrun", prompt="or not", max_tokens=8,
                                      temperature=0, extra_body={
                                          "n_loops": 5, "adaptive_threshold": 0.4,
                                          "adaptive_prompt": True, "return_loops": True})
        choice = r.model_dump()["choices"][0]
        assert choice["text"] == adaptive.texts[0] and choice["loops"] == adaptive.loops[0]

        # a list of prompts, a seed, a stop string
        seeded = reference(model_and_tokenizer, "the", max_tokens=5, temperature=0.9, seed=7)
        r = client.completions.create(model="tinyrun", prompt=["To", "the"], max_tokens=5,
                                      temperature=0.9, seed=7)
        assert r.choices[1].text == seeded.texts[0]  # each prompt samples with the seed
        r = client.completions.create(model="tinyrun", prompt=["To", "the"], max_tokens=5,
                                      temperature=0)
        assert [c.index for c in r.choices] == [0, 1]
        full = reference(model_and_tokenizer, "the", max_tokens=12, temperature=0).texts[0]
        stop = full[3:5] if len(full) >= 5 else None
        if stop and stop.strip():
            r = client.completions.create(model="tinyrun", prompt="the", max_tokens=12,
                                          temperature=0, stop=[stop])
            assert r.choices[0].text == full[:full.find(stop)]
            assert r.choices[0].finish_reason == "stop"
            streamed = client.completions.create(model="tinyrun", prompt="the", max_tokens=12,
                                                 temperature=0, stop=[stop], stream=True)
            assert "".join(c.choices[0].text for c in streamed) == r.choices[0].text


def test_greedy_completions_among_16_concurrent_requests_equal_generate_alone(
        model_and_tokenizer):
    rng = random.Random(0)
    words = TEXTS[0].split()
    jobs = [(" ".join(rng.sample(words, rng.randint(1, 6))), rng.randint(1, 4),
             rng.choice([0, 0, 0.8]), rng.randint(1, 12)) for _ in range(16)]
    server, _ = start(model_and_tokenizer, max_batch=16)
    with server as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)

        def ask(job):
            prompt, n_loops, temperature, max_tokens = job
            return client.completions.create(
                model="tinyrun", prompt=prompt, max_tokens=max_tokens, temperature=temperature,
                seed=11, extra_body={"n_loops": n_loops, "return_loops": True})

        with ThreadPoolExecutor(16) as pool:
            responses = list(pool.map(ask, jobs))
    for (prompt, n_loops, temperature, max_tokens), r in zip(jobs, responses, strict=True):
        alone = reference(model_and_tokenizer, prompt, n_loops=n_loops, max_tokens=max_tokens,
                          temperature=temperature, seed=11)
        choice = r.model_dump()["choices"][0]
        assert choice["text"] == alone.texts[0], (prompt, n_loops, temperature)
        assert choice["loops"] == alone.loops[0]


@pytest.mark.parametrize("body, status, words", [
    ("{not json", 400, ["JSON"]),
    ({"prompt": "To be", "n_loops": 0}, 400, ["n_loops", "greater than or equal to 1"]),
    ({"prompt": "To be", "n_loops": 7}, 400, ["n_loops=7", "1 .. 6"]),
    ({"prompt": "To be " * 40}, 400, ["tokens, longer than", "context of 48"]),
    ({"prompt": "To be", "max_tokens": 10**9}, 400, ["max_tokens=1000000000", "at most"]),
    ({"prompt": "To be", "model": "gpt-4"}, 404, ["'gpt-4'", "tinyrun"]),
    ({"prompt": "To be", "max_tokens": "5"}, 400, ["max_tokens", "integer"]),
    ({"prompt": "To be", "temperature": "hot"}, 400, ["temperature", "number"]),
    ({"prompt": "To be", "top_p": 0}, 400, ["top_p"]),
    ({"prompt": 5}, 400, ["prompt=5", "a string"]),
    ({"prompt": [[1, 2], "x", None]}, 400, ["prompt="]),
    ({"prompt": [100000]}, 400, ["token id 100000", "vocabulary"]),
    ({"prompt": "To be", "stream": "yes"}, 400, ["stream", "boolean"]),
    ({"prompt": "To be", "stop": ["a", "b", "c", "d", "e"]}, 400, ["stop="]),
    ({"prompt": "To be", "adaptive_threshold": -1}, 400, ["adaptive_threshold"]),
    ({"prompt": "To be", "adaptive_prompt": True}, 400, ["adaptive_prompt=True needs an "
                                                          "adaptive_threshold"]),
    ({"prompt": "To be", "adaptive_threshold": 0.1, "adaptive_criterion": "kl",
      "adaptive_prompt": True}, 400, ["adaptive_prompt=True with adaptive_criterion='kl'"]),
    # issue 22: D1 (a float32 overflow once broke every later request) and D2 (500s)
    ({"prompt": "hi", "max_tokens": 3, "temperature": 1e39}, 400, ["temperature=1e+39"]),
    ('{"prompt": "hi", "max_tokens": 3, "temperature": Infinity}', 400, ["temperature"]),
    ({"prompt": "hi", "max_tokens": 3, "seed": 2**70}, 400, ["seed=1180591620717411303424"]),
    ('{"prompt": "\\ud800", "max_tokens": 3}', 400, ["prompt 0 cannot be tokenized"]),
])
def test_bad_requests_get_a_clear_4xx_and_the_server_stays_up(model_and_tokenizer, body,
                                                                 status, words):
    server, _ = start(model_and_tokenizer)
    with server as url:
        content = body if isinstance(body, str) else json.dumps(body)
        r = httpx.post(f"{url}/v1/completions", content=content,
                       headers={"content-type": "application/json"})
        assert r.status_code == status, r.text
        message = r.json()["error"]["message"]
        for word in words:
            assert word in message, message
        ok = httpx.post(f"{url}/v1/completions", json={"prompt": "To be", "max_tokens": 2})
        assert ok.status_code == 200 and len(ok.json()["choices"]) == 1


def test_full_queue_gets_429_and_metrics_count_it(model_and_tokenizer):
    server, engine = start(model_and_tokenizer, delay=0.0, max_batch=1, max_queue=1)
    engine.gate.clear()  # steps wait: the first request holds the only slot
    with server as url, ThreadPoolExecutor(2) as pool:
        def post():
            return httpx.post(f"{url}/v1/completions", json={"prompt": "To", "max_tokens": 3},
                              timeout=60)
        first = pool.submit(post)
        wait_until(lambda: httpx.get(f"{url}/health").json()["batch_size"] == 1)
        second = pool.submit(post)
        wait_until(lambda: httpx.get(f"{url}/health").json()["queue_length"] == 1)
        third = post()
        assert third.status_code == 429 and "queue is full" in third.json()["error"]["message"]
        engine.gate.set()
        assert first.result().status_code == 200 and second.result().status_code == 200
        metrics = httpx.get(f"{url}/metrics").text
    assert 'loopedlm_requests_total{status="429"} 1.0' in metrics
    assert 'loopedlm_requests_total{status="200"} 2.0' in metrics
    assert "loopedlm_queue_length 0.0" in metrics and "loopedlm_batch_size" in metrics
    generated = [line for line in metrics.splitlines()
                 if line.startswith("loopedlm_generated_tokens_total")]
    assert float(generated[0].split()[-1]) >= 2
    assert "loopedlm_loops_spent_total" in metrics
    counters = {line.split()[0]: float(line.split()[-1]) for line in metrics.splitlines()
                if line.startswith(("loopedlm_prompt_tokens_total", "loopedlm_prompt_loops"))}
    assert counters["loopedlm_prompt_loops_spent_total"] == \
        model_and_tokenizer[0].config.n_loops * counters["loopedlm_prompt_tokens_total"] > 0


def test_a_client_that_disconnects_frees_its_slot(model_and_tokenizer):
    server, _ = start(model_and_tokenizer, delay=0.05, max_batch=1)
    body = {"prompt": "To", "max_tokens": 40, "temperature": 0}
    with server as url:
        with httpx.stream("POST", f"{url}/v1/completions", json={**body, "stream": True}) as r:
            lines = r.iter_lines()  # (kept: closing the iterator closes the response)
            next(lines)  # the first token arrived: the request holds the slot
            assert httpx.get(f"{url}/health").json()["batch_size"] == 1
        wait_until(lambda: httpx.get(f"{url}/health").json()["batch_size"] == 0, 10)
        # a non-streaming client that gives up is noticed too
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{url}/v1/completions", json=body, timeout=0.5)
        wait_until(lambda: httpx.get(f"{url}/health").json()["batch_size"] == 0, 10)
        metrics = httpx.get(f"{url}/metrics").text
        assert 'loopedlm_sequences_finished_total{reason="cancelled"} 2.0' in metrics
        r = httpx.post(f"{url}/v1/completions", json={**body, "max_tokens": 2}, timeout=60)
        assert r.status_code == 200


def test_per_request_timeout_ends_a_generation(model_and_tokenizer):
    server, _ = start(model_and_tokenizer, delay=0.05)
    with server as url:
        r = httpx.post(f"{url}/v1/completions", timeout=60, json={
            "prompt": "To", "max_tokens": 40, "temperature": 0, "timeout": 0.3,
            "return_loops": True})
        choice = r.json()["choices"][0]
        assert r.status_code == 200 and choice["finish_reason"] == "timeout"
        assert len(choice["loops"]) < 40


def test_health_models_and_web_page(model_and_tokenizer):
    server, _ = start(model_and_tokenizer)
    with server as url:
        assert httpx.get(f"{url}/health").json()["status"] == "ok"
        card = httpx.get(f"{url}/v1/models").json()["data"][0]
        assert card["max_loops"] == 6 and card["n_loops"] == 3 and card["context_length"] == 48
        page = httpx.get(f"{url}/")
        assert page.status_code == 200 and "text/html" in page.headers["content-type"]
        assert "n_loops" in page.text and "/v1/completions" in page.text


def test_serve_command_rejects_bad_flags(run_dir, capsys):
    from loopedlm.cli import main

    assert main(["serve", str(run_dir), "--max-batch", "0"]) == 2
    assert "max_batch=0" in capsys.readouterr().err


# ---- slow tier: the load test and the web page in a real browser ---------------------------------
def _bench_serve():
    import importlib.util
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_serve.py"
    spec = importlib.util.spec_from_file_location("bench_serve", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_serve"] = module  # (dataclasses look their module up)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_load_64_streaming_clients_x_20_requests_nothing_lost_duplicated_or_mixed(
        model_and_tokenizer):
    bench = _bench_serve()
    server, _ = start(model_and_tokenizer, max_batch=16, max_queue=128)
    with server as url:
        summary = bench.load_test(url, clients=64, requests=20, max_tokens=8)
        metrics = httpx.get(f"{url}/metrics").text
    assert summary["requests"] == 64 * 20
    assert 'loopedlm_requests_total{status="429"}' not in metrics


# ---- the per-loop view the web page reads -----------------------------------------------------
def test_loop_trace_is_the_per_loop_view_of_a_completion(model_and_tokenizer):
    from loopedlm.infer.trace import trace_loops

    model, tokenizer = model_and_tokenizer
    done = reference(model_and_tokenizer, "To be", n_loops=2, max_tokens=6, temperature=0)
    ids = done.tokens[0]
    server, _ = start(model_and_tokenizer)
    with server as url:
        by_ids = httpx.post(f"{url}/v1/loop_trace", json={
            "prompt": "To be", "completion": ids, "n_loops": 4, "top_k": 3}).json()
        text = httpx.post(f"{url}/v1/completions", json={
            "prompt": "To be", "max_tokens": 6, "temperature": 0, "n_loops": 2}).json()
        completion = text["choices"][0]["text"]
        by_text = httpx.post(f"{url}/v1/loop_trace", json={
            "prompt": "To be", "completion": completion}).json()
        too_many = httpx.post(f"{url}/v1/loop_trace", json={
            "prompt": "To be", "completion": ids, "n_loops": 7})
    expected = trace_loops(model, [tokenizer.bos_id, *tokenizer.encode("To be")], ids,
                           n_loops=4, top_k=3)
    assert by_ids["n_loops"] == 4 and len(by_ids["tokens"]) == len(ids)
    for got, want in zip(by_ids["tokens"], expected, strict=True):
        assert got["token"] == want["token"] and len(got["loops"]) == 4
        for step, ref in zip(got["loops"], want["loops"], strict=True):
            assert step["p"] == pytest.approx(ref["p"]) and \
                step["entropy"] == pytest.approx(ref["entropy"])
            assert [t["text"] for t in step["top"]] == [tokenizer.decode([i]) for i, _ in ref["top"]]
        # greedy at N=2: the token is loop 2's top token
        assert got["loops"][1]["top"][0]["text"] == tokenizer.decode([got["token"]])
    assert "".join(t["text"] for t in by_ids["tokens"]) == tokenizer.decode(ids)
    # text is tokenized alone; its pieces put together give it back, at the model's loops
    assert "".join(t["text"] for t in by_text["tokens"]) == completion
    assert by_text["n_loops"] == model.config.n_loops
    assert too_many.status_code == 400 and "1 .. 6" in too_many.json()["error"]["message"]


def chromium_driver():
    """Headless Debian chromium through chromedriver (skips where they are missing)."""
    import shutil

    webdriver = pytest.importorskip("selenium.webdriver")
    binary, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not binary or not driver:
        pytest.skip("chromium and chromium-driver are not installed (apt-get install chromium "
                    "chromium-driver)")
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                 "--window-size=1100,800"):
        options.add_argument(flag)
    return webdriver.Chrome(options=options, service=webdriver.ChromeService(driver))


def use_page(browser, url: str, prompt: str, *, n_loops: int, adaptive: float | None = None,
             max_tokens: int = 12, timeout: float = 60.0) -> list[tuple[str, int, str]]:
    """Type a prompt, pick the loops, press Generate, wait for the end; the tokens shown
    as (text, loops, background)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(url)
    wait = WebDriverWait(browser, timeout)
    wait.until(lambda b: b.find_element(By.ID, "legend").text.startswith("loops per token"))
    for field_id, value in (("prompt", prompt), ("n_loops", n_loops), ("max_tokens", max_tokens),
                            ("temperature", 0)):
        element = browser.find_element(By.ID, field_id)
        element.clear()
        element.send_keys(str(value))
    box = browser.find_element(By.ID, "adaptive")
    if (adaptive is not None) != box.is_selected():
        box.click()
    if adaptive is not None:
        element = browser.find_element(By.ID, "threshold")
        element.clear()
        element.send_keys(str(adaptive))
    browser.find_element(By.ID, "go").click()
    wait.until(lambda b: "finished" in b.find_element(By.ID, "stats").text)
    spans = browser.find_elements(By.CSS_SELECTOR, "#output .tok")
    return [(s.get_attribute("textContent"), int(s.get_attribute("data-loops")),
             s.value_of_css_property("background-color")) for s in spans]


@pytest.mark.slow
def test_web_page_streams_tokens_shaded_by_their_loops(model_and_tokenizer, tmp_path):
    browser = chromium_driver()
    server, _ = start(model_and_tokenizer)
    try:
        with server as url:
            fixed = use_page(browser, url, "To be", n_loops=2)
            expected = reference(model_and_tokenizer, "To be", n_loops=2, max_tokens=12,
                                 temperature=0)
            assert "".join(text for text, _, _ in fixed) == expected.texts[0]
            assert {loops for _, loops, _ in fixed} == {2}
            more = use_page(browser, url, "To be", n_loops=6)
            assert {loops for _, loops, _ in more} == {6}
            assert fixed[0][2] != more[0][2]  # more loops, another shade
            adaptive = use_page(browser, url, "or not", n_loops=6, adaptive=0.4)
            api = reference(model_and_tokenizer, "or not", n_loops=6, max_tokens=12,
                            temperature=0, adaptive_threshold=0.4)
            assert "".join(text for text, _, _ in adaptive) == api.texts[0]
            assert all(1 <= loops <= 6 for _, loops, _ in adaptive)
            shades = {loops: colour for _, loops, colour in fixed + more + adaptive}
            assert len(set(shades.values())) == len(shades)  # one shade per loop count
            browser.save_screenshot(str(tmp_path / "serve_page.png"))
    finally:
        browser.quit()


@pytest.mark.slow
def test_web_page_shows_each_loops_top_tokens_when_a_token_is_hovered(model_and_tokenizer):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser = chromium_driver()
    server, _ = start(model_and_tokenizer)
    try:
        with server as url:
            shown = use_page(browser, url, "To be", n_loops=3, max_tokens=6)
            wait = WebDriverWait(browser, 60)
            wait.until(lambda b: b.find_elements(By.CSS_SELECTOR, "#output .tok.traced"))
            first = browser.find_elements(By.CSS_SELECTOR, "#output .tok")[0]
            ActionChains(browser).move_to_element(first).perform()
            wait.until(lambda b: b.find_elements(By.CSS_SELECTOR, "#trace tr.loop"))
            rows = browser.find_elements(By.CSS_SELECTOR, "#trace tr.loop")
            assert [r.find_element(By.TAG_NAME, "td").text for r in rows] == ["1", "2", "3"]
            # greedy at N=3: the hovered token is the last loop's top token (marked)
            top = rows[-1].find_elements(By.CSS_SELECTOR, "td:nth-child(4) > span")
            assert top[0].get_attribute("class") == "hit"
            assert shown and len(top) == 5
    finally:
        browser.quit()
