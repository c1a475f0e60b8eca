"""`chipshift serve` live on 127.0.0.1: the official openai client, hostile requests, load,
and a client that walks away mid-stream."""

import json
import random
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest

from infer_helpers import REPO, live_server, make_checkpoint, metric

KEY = "sk-chipshift-test"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tiny_tokenizer_dir):
    return make_checkpoint(tiny_tokenizer_dir, tmp_path_factory.mktemp("serve") / "tiny-chat")


@pytest.fixture(scope="module")
def server(checkpoint):
    with live_server(checkpoint, "--api-key", KEY, "--max-batch", "8") as url:
        yield url


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key=KEY, max_retries=0, timeout=60)


def test_openai_client_chat_and_completions(server, client):
    assert [m.id for m in client.models.list().data] == ["tiny-chat"]
    messages = [{"role": "user", "content": "hello there"}]

    chat = client.chat.completions.create(model="tiny-chat", messages=messages, max_tokens=12, temperature=0)
    choice = chat.choices[0]
    assert choice.message.role == "assistant" and choice.finish_reason in ("stop", "length")
    assert 1 <= chat.usage.completion_tokens <= 12
    assert chat.usage.total_tokens == chat.usage.prompt_tokens + chat.usage.completion_tokens

    stream = client.chat.completions.create(model="tiny-chat", messages=messages, max_tokens=12, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == choice.message.content  # greedy: the same reply, streamed
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == choice.finish_reason
    assert chunks[-1].usage.completion_tokens == chat.usage.completion_tokens

    comp = client.completions.create(model="tiny-chat", prompt="the capital of", max_tokens=10, temperature=0,
                                     extra_body={"ignore_eos": True})
    assert comp.choices[0].finish_reason == "length" and comp.usage.completion_tokens == 10
    parts = list(client.completions.create(model="tiny-chat", prompt="the capital of", max_tokens=10,
                                           temperature=0, stream=True, extra_body={"ignore_eos": True}))
    assert "".join(p.choices[0].text for p in parts) == comp.choices[0].text
    assert parts[-1].choices[0].finish_reason == "length"

    seeded = [client.completions.create(model="tiny-chat", prompt="tokens", max_tokens=16, temperature=1.0,
                                        top_p=0.9, seed=7, extra_body={"top_k": 50, "repetition_penalty": 1.2,
                                                                       "ignore_eos": True}).choices[0].text
              for _ in range(2)]
    assert seeded[0] == seeded[1]


def test_api_key_required(server):
    wrong = openai.OpenAI(base_url=server + "/v1", api_key="sk-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as err:
        wrong.models.list()
    assert err.value.status_code == 401
    assert err.value.body["code"] == "invalid_api_key"
    for path in ("/v1/models", "/metrics"):
        r = httpx.get(server + path)
        assert r.status_code == 401 and r.json()["error"]["message"]
    assert httpx.get(server + "/health").status_code == 200


def _bad_requests(rng: random.Random, prompt_ids_too_long: list[int]):
    """Yield (method, path, headers, body bytes) of requests that must get a 4xx."""
    good_chat = {"model": "tiny-chat", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    good_comp = {"model": "tiny-chat", "prompt": "hi", "max_tokens": 4}
    junk = [None, True, -1, 0, 3.5, "x", [], {}, [1, "a"], {"a": 1}, float("nan")]
    field_breakers = {
        "model": [None, 5, "nope", "", ["tiny-chat"]],
        "messages": [None, "hi", [], [1], [{"role": "robot", "content": "x"}], [{"role": "user"}],
                     [{"role": "user", "content": 5}], [{"role": "user", "content": [{"type": "image_url"}]}]],
        "prompt": [None, "", [], [-1], [10 ** 9], [1.5], prompt_ids_too_long, ["a", "b"], {"x": 1}],
        "max_tokens": [0, -3, "4", 4.5, True, 10 ** 6, 600],
        "temperature": ["hot", -0.1, 2.5, [], True],
        "top_p": [0, -1, 1.5, "0.5"],
        "top_k": [-1, 2.5, "3"],
        "n": [2, 3, 0, "1"],
        "stream": ["yes", 1, {}],
        "stop": [5, [1, 2], ["a", "b", "c", "d", "e"], [""], {"x": 1}],
        "seed": ["7", 1.5],
        "stream_options": [{"include_usage": "yes"}, {"bogus": True}, 5],
        "presence_penalty": [0.5, "x", 3.0],
        "frequency_penalty": [1.0],
        "logprobs": [6, -1, "3", 2.5], "top_logprobs": [21, -1, "2"], "echo": ["yes", 1],
        "best_of": [2], "logit_bias": [{"1": 100}],
        "tools": [[{"type": "function"}]], "response_format": [{"type": "json_object"}],
        "repetition_penalty": [0, -1, "x", 100],
        "ignore_eos": ["no", 1],
    }
    while True:
        kind = rng.randrange(7)
        chat = rng.random() < 0.5
        path = "/v1/chat/completions" if chat else "/v1/completions"
        base = dict(good_chat if chat else good_comp)
        if kind == 0:  # malformed JSON
            text = json.dumps(base)
            raw = rng.choice([text[:rng.randrange(1, len(text))], text + "}", "{'model': 1}", "\xff\xfe",
                              "", "nul\x00l", "[" * 50]).encode("utf-8", "surrogateescape")
            yield "POST", path, AUTH, raw
        elif kind == 1:  # not an object
            yield "POST", path, AUTH, json.dumps(rng.choice(junk[:-1] + [[base]])).encode()
        elif kind == 2:  # a required field missing
            base.pop(rng.choice(["model", "messages" if chat else "prompt"]))
            yield "POST", path, AUTH, json.dumps(base).encode()
        elif kind == 3:  # a field broken
            key = rng.choice([k for k in field_breakers if k != ("prompt" if chat else "messages")])
            base[key] = rng.choice(field_breakers[key])
            yield "POST", path, AUTH, json.dumps(base).encode()
        elif kind == 4:  # an argument nobody knows
            base["".join(rng.choice("abcdefghij_") for _ in range(rng.randrange(3, 12)))] = rng.choice(junk[:-1])
            yield "POST", path, AUTH, json.dumps(base).encode()
        elif kind == 5:  # a wrong or missing key
            yield "POST", path, rng.choice([{}, {"Authorization": "Bearer nope"}, {"Authorization": KEY}]), \
                json.dumps(base).encode()
        else:  # wrong method or route
            yield rng.choice([("GET", path), ("DELETE", "/v1/models"), ("POST", "/v1/embeddings"),
                              ("GET", "/v1/nothing")]) + (AUTH, b"")


def test_randomised_bad_requests_then_a_good_one(server, client):
    rng = random.Random(1234)
    statuses = {}
    with httpx.Client(base_url=server, timeout=30) as http:
        gen = _bad_requests(rng, list(range(3, 200)) * 3)
        for _ in range(520):
            method, path, headers, body = next(gen)
            r = http.request(method, path, headers={"Content-Type": "application/json", **headers}, content=body)
            assert 400 <= r.status_code < 500, (method, path, body[:200], r.status_code, r.text[:200])
            err = r.json()["error"]
            assert isinstance(err["message"], str) and err["message"] and "type" in err
            statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
    assert set(statuses) >= {400, 401, 404}
    reply = client.chat.completions.create(model="tiny-chat", messages=[{"role": "user", "content": "hi"}],
                                           max_tokens=5)
    assert reply.choices[0].finish_reason in ("stop", "length")
    assert httpx.get(server + "/health").json() == {"status": "ok"}


def test_unsupported_parameters_are_named(server):
    r = httpx.post(server + "/v1/chat/completions", headers=AUTH, json={
        "model": "tiny-chat", "messages": [{"role": "user", "content": "hi"}], "n": 2})
    assert r.status_code == 400 and "'n'" in r.json()["error"]["message"] and r.json()["error"]["param"] == "n"
    r = httpx.post(server + "/v1/completions", headers=AUTH, json={"model": "tiny-chat", "prompt": "x",
                                                                     "best_of": 3})
    assert r.status_code == 400 and "not supported" in r.json()["error"]["message"]
    r = httpx.post(server + "/v1/completions", headers=AUTH, json={"model": "tiny-chat", "prompt": [5] * 600})
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"


def _engine_logprobs(ckpt, ids, **wish):
    """The same greedy request through an engine in this process (the same precision policy
    as the server's): its Request, with the engine's own log-probabilities."""
    from chipshift.infer.engine import Engine, Request
    from chipshift.infer.sampling import SamplingParams

    engine = Engine.from_checkpoint(ckpt, device="cpu", max_batch=1)
    req = engine.submit(Request(ids, SamplingParams(temperature=0.0, **wish)))
    while not req.done.is_set():
        engine.step()
    return engine, req


def test_completions_logprobs_and_echo_through_the_openai_client(checkpoint, client):
    """`logprobs` and `echo` as OpenAI defines them: the prompt's tokens (the first without a
    log-probability) then the completion's, each with its alternatives and the chosen token;
    the values are the engine's own; streamed chunks carry the same entries."""
    ask = dict(model="tiny-chat", prompt="the capital of", max_tokens=8, temperature=0, logprobs=3, echo=True,
               extra_body={"ignore_eos": True})
    comp = client.completions.create(**ask)
    choice = choice_lp = comp.choices[0]
    engine, req = _engine_logprobs(checkpoint, engine_ids := client_ids(checkpoint, "the capital of"),
                                   max_tokens=8, ignore_eos=True, logprobs=3, prompt_logprobs=3)
    lp = choice_lp.logprobs
    T = len(engine_ids)
    assert choice.text == "the capital of" + engine.tokenizer.decode(req.output_ids)
    assert len(lp.tokens) == T + 8 and _joined(lp.tokens) == choice.text
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    want = [e.logprob for e in req.prompt_logprobs[1:] + req.logprobs]
    assert max(abs(a - b) for a, b in zip(lp.token_logprobs[1:], want)) < 1e-6
    for token, value, top in zip(lp.tokens[1:], lp.token_logprobs[1:], lp.top_logprobs[1:]):
        assert top[token] == value and 3 <= len(top) <= 4 and max(top.values()) <= 0
    assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)
    assert all(choice.text[at:at + len(t)] == t for t, at in zip(lp.tokens, lp.text_offset)
               if not t.startswith("bytes:")), (lp.tokens, lp.text_offset, choice.text)
    parts = list(client.completions.create(**ask, stream=True))
    assert parts[0].choices[0].text == "the capital of"
    assert "".join(p.choices[0].text for p in parts) == choice.text
    streamed = [p.choices[0].logprobs for p in parts if p.choices[0].logprobs]
    for key in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
        assert sum((getattr(s, key) for s in streamed), []) == getattr(lp, key), key
    plain = client.completions.create(model="tiny-chat", prompt="the capital of", max_tokens=3, temperature=0,
                                      echo=True)
    assert plain.choices[0].text.startswith("the capital of") and plain.choices[0].logprobs is None
    assert client.completions.create(model="tiny-chat", prompt="x", max_tokens=2).choices[0].logprobs is None


def _joined(tokens: list[str]) -> str:
    """The tokens' text, pieces of UTF-8 characters (`bytes:\\xe4`) put back together."""
    raw = b"".join(bytes.fromhex(t[6:].replace("\\x", "")) if t.startswith("bytes:") else t.encode()
                   for t in tokens)
    return raw.decode("utf-8", "replace")


def client_ids(ckpt, text):
    from chipshift.data.tokenizer import Tokenizer

    return Tokenizer.load(ckpt).encode(text)


def test_chat_logprobs_through_the_openai_client(checkpoint, client):
    from chipshift.data.tokenizer import Tokenizer

    messages = [{"role": "user", "content": "hello there"}]
    ask = dict(model="tiny-chat", messages=messages, max_tokens=12, temperature=0, logprobs=True, top_logprobs=2)
    chat = client.chat.completions.create(**ask)
    tok = Tokenizer.load(checkpoint)
    ids = tok.encode(tok.apply_chat_template(messages))
    _, req = _engine_logprobs(checkpoint, ids, max_tokens=12, logprobs=2)
    content = chat.choices[0].logprobs.content
    assert len(content) == len(req.output_ids) - req.stop_token  # a final stop token is not shown
    assert b"".join(bytes(c.bytes) for c in content).decode("utf-8", "replace") == chat.choices[0].message.content
    for c, e in zip(content, req.logprobs):
        assert abs(c.logprob - e.logprob) < 1e-6 and bytes(c.bytes) == tok.token_bytes(e.token)
        assert [t.logprob for t in c.top_logprobs] == pytest.approx([lp for _, lp in e.top], abs=1e-6)
        assert len(c.top_logprobs) == 2 and c.top_logprobs[0].logprob >= c.logprob - 1e-6
    chunks = list(client.chat.completions.create(**ask, stream=True))
    streamed = [x for c in chunks if c.choices and c.choices[0].logprobs for x in c.choices[0].logprobs.content]
    assert [(c.token, c.logprob) for c in streamed] == [(c.token, c.logprob) for c in content]
    plain = client.chat.completions.create(model="tiny-chat", messages=messages, max_tokens=2, logprobs=False)
    assert plain.choices[0].logprobs is None


def test_bad_logprob_values_get_a_400_naming_the_field(server, client):
    chat = {"model": "tiny-chat", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    comp = {"model": "tiny-chat", "prompt": "hi", "max_tokens": 2}
    cases = [("/v1/completions", comp, {"logprobs": 6}, "logprobs"),
             ("/v1/completions", comp, {"logprobs": -1}, "logprobs"),
             ("/v1/completions", comp, {"logprobs": True}, "logprobs"),
             ("/v1/completions", comp, {"echo": "yes"}, "echo"),
             ("/v1/completions", comp, {"top_logprobs": 2}, "top_logprobs"),
             ("/v1/chat/completions", chat, {"logprobs": 3}, "logprobs"),
             ("/v1/chat/completions", chat, {"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
             ("/v1/chat/completions", chat, {"logprobs": True, "top_logprobs": 1.5}, "top_logprobs"),
             ("/v1/chat/completions", chat, {"top_logprobs": 2}, "top_logprobs"),
             ("/v1/chat/completions", chat, {"echo": True}, "echo")]
    for path, base, extra, field in cases:
        r = httpx.post(server + path, headers=AUTH, json={**base, **extra})
        assert r.status_code == 400 and r.json()["error"]["param"] == field, (extra, r.text)
        assert f"'{field}'" in r.json()["error"]["message"] or field in r.json()["error"]["message"]
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="tiny-chat", prompt="hi", max_tokens=2, logprobs=9)
    ok = client.completions.create(model="tiny-chat", prompt="hi", max_tokens=2, logprobs=5, echo=True)
    assert len(ok.choices[0].logprobs.top_logprobs[-1]) >= 5


def test_32_concurrent_clients(server):
    results, failures = [], []

    def worker(i):
        with httpx.Client(base_url=server, headers=AUTH, timeout=120) as http:
            for j in range(10):
                body = {"model": "tiny-chat", "max_tokens": 6, "temperature": 0.8, "seed": i * 100 + j}
                stream = (i + j) % 2 == 0
                if j % 3:
                    path, body = "/v1/chat/completions", {**body, "messages": [{"role": "user", "content": f"q{i}"}]}
                else:
                    path, body = "/v1/completions", {**body, "prompt": f"tokens {i} {j}"}
                try:
                    if stream:
                        with http.stream("POST", path, json={**body, "stream": True}) as r:
                            lines = [ln for ln in r.iter_lines() if ln]
                            ok = r.status_code == 200 and lines[-1] == "data: [DONE]"
                            finish = json.loads(lines[-2][6:])["choices"][0]["finish_reason"] if ok else None
                    else:
                        r = http.post(path, json=body)
                        ok = r.status_code == 200
                        finish = r.json()["choices"][0]["finish_reason"] if ok else None
                    if ok and finish in ("stop", "length"):
                        results.append((i, j))
                    else:
                        failures.append((i, j, r.status_code))
                except httpx.HTTPError as exc:
                    failures.append((i, j, repr(exc)))

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(32)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not failures
    assert sorted(results) == [(i, j) for i in range(32) for j in range(10)]
    assert metric(server, "chipshift_queue_length", AUTH) == 0


def test_disconnect_mid_stream_frees_the_slot(server):
    cancelled_before = _cancelled(server)
    body = {"model": "tiny-chat", "prompt": "hello", "max_tokens": 480, "stream": True, "ignore_eos": True}
    with httpx.Client(base_url=server, headers=AUTH, timeout=30) as http:
        with http.stream("POST", "/v1/completions", json=body) as r:
            lines = r.iter_lines()
            assert next(lines).startswith("data: ")
            assert metric(server, "chipshift_active_slots", AUTH) == 1
    # leaving the block closed the connection after one event
    deadline = time.monotonic() + 20
    while metric(server, "chipshift_active_slots", AUTH) != 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert metric(server, "chipshift_active_slots", AUTH) == 0
    assert _cancelled(server) == cancelled_before + 1


def _cancelled(url) -> int:
    for line in httpx.get(url + "/metrics", headers=AUTH).text.splitlines():
        if line.startswith('chipshift_requests_total{finish_reason="cancelled"}'):
            return int(line.split()[1])
    return 0


def test_relay_hands_a_step_over_in_one_wakeup_and_waits_for_it():
    """The relay wakes the event loop once per engine step, returns once the loop has run
    the woken streams, and never hangs when the loop is gone."""
    import asyncio

    from chipshift.infer.server import Relay

    relay, got, wakeups = Relay(wait=5.0), [], []
    loop = asyncio.new_event_loop()
    queues = []

    async def consume(q):
        while True:
            item = await q.get()
            got.append(item)
            if item[1]:
                return

    def serve():
        asyncio.set_event_loop(loop)
        queues.extend(asyncio.Queue() for _ in range(3))
        tasks = [loop.create_task(consume(q)) for q in queues]
        loop.run_until_complete(asyncio.gather(*tasks))

    thread = threading.Thread(target=serve)
    thread.start()
    while len(queues) < 3:
        time.sleep(0.01)
    relay.loop = loop
    push = relay._push
    relay._push = lambda items: wakeups.append(len(items)) or push(items)
    for step in range(3):
        for q in queues:
            relay.put(q, (f"t{step}", step == 2))
        relay.deliver()
        assert len(got) == 3 * (step + 1)  # the streams ran before deliver returned
    assert wakeups == [3, 3, 3]
    thread.join(5)
    loop.close()
    relay.put(queues[0], ("late", True))
    t0 = time.monotonic()
    relay.deliver()  # the loop is closed: returns at once
    assert time.monotonic() - t0 < 1.0


def test_metrics_are_prometheus_text(server):
    r = httpx.get(server + "/metrics", headers=AUTH)
    assert r.headers["content-type"].startswith("text/plain")
    names = {line.split()[2] for line in r.text.splitlines() if line.startswith("# TYPE")}
    assert {"chipshift_requests_total", "chipshift_generation_tokens_total", "chipshift_queue_length",
            "chipshift_time_to_first_token_seconds"} <= names
    assert metric(server, "chipshift_time_to_first_token_seconds_count", AUTH) >= 1
    assert metric(server, "chipshift_generation_tokens_total", AUTH) >= 1


def test_chat_command_streams_a_reply(tmp_path, tiny_tokenizer_dir):
    ckpt = make_checkpoint(tiny_tokenizer_dir, tmp_path / "tiny-chat")
    proc = subprocess.run([sys.executable, "-m", "chipshift", "chat", str(ckpt), "--device", "cpu",
                           "--temperature", "0", "--max-tokens", "8"],
                          input="hello there\n/reset\nhow are you?\n/quit\n", capture_output=True, text=True,
                          cwd=REPO, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("assistant> ") == 2
    assert "8 slots" in proc.stderr


@pytest.mark.any_class
def test_serve_refuses_a_missing_checkpoint_in_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "chipshift", "serve", str(tmp_path / "nope"), "--device", "cpu"],
                          capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "not found" in proc.stderr


@pytest.mark.any_class
def test_serve_refuses_a_checkpoint_whose_last_handoff_failed(tmp_path, tiny_tokenizer_dir):
    from chipshift.model.checkpoint import update_sidecar

    ckpt = make_checkpoint(tiny_tokenizer_dir, tmp_path / "handed-off")
    update_sidecar(ckpt, handoffs=[{"from": "cpu:float32", "to": "cpu:bfloat16", "time": "2026-01-01T00:00:00Z",
                                    "verdict": "fail", "first_failing": {"forward": "layers.1.mlp"},
                                    "report": "r/report.md"}])
    proc = subprocess.run([sys.executable, "-m", "chipshift", "serve", str(ckpt), "--device", "cpu"],
                          capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 2
    assert "handoff" in proc.stderr and "layers.1.mlp" in proc.stderr and "--force" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_sigterm_ends_streams_and_exits_cleanly_and_a_taken_port_is_one_line(tmp_path, tiny_tokenizer_dir):
    """The scheduler owns the main thread (HTTP runs on a second one): SIGTERM must still stop
    the server, answer a stream in flight instead of leaving it hanging, and exit 0; a port
    that is taken is reported in one line with exit status 2."""
    import os
    import signal

    from infer_helpers import free_port

    ckpt = make_checkpoint(tiny_tokenizer_dir, tmp_path / "tiny-chat", chatty=True)
    port = free_port()
    cmd = [sys.executable, "-m", "chipshift", "serve", str(ckpt), "--port", str(port), "--device", "cpu"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                assert proc.poll() is None and time.monotonic() < deadline
                time.sleep(0.2)
        second = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)  # same port
        assert second.returncode == 2 and f"could not serve on 127.0.0.1:{port}" in second.stderr
        assert "Traceback" not in second.stderr
        body = {"model": "tiny-chat", "prompt": "hello", "max_tokens": 100, "stream": True,
                "ignore_eos": True}
        lines = []
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as r:
            for line in r.iter_lines():
                lines.append(line)
                if len(lines) == 3:
                    proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        assert lines[-1] == "data: [DONE]" or any("shutting down" in line for line in lines)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.parametrize("sig", ["SIGKILL", "SIGTERM"])
def test_a_served_block_whose_process_is_killed_leaves_no_server_behind(tmp_path, tiny_tokenizer_dir, sig):
    """`served()` (the eval and serve stages' server): when the process that started the
    server is SIGKILLed (no clean-up of its own can run) the server notices and exits; on
    SIGTERM the block's clean-up stops it as on Ctrl-C."""
    import os
    import signal

    ckpt = make_checkpoint(tiny_tokenizer_dir, tmp_path / "tiny-chat")
    script = ("import sys, time\nfrom chipshift.infer.cli import served\n"
              f"with served({str(ckpt)!r}, 'cpu', 'float32', log=lambda m: None) as url:\n"
              "    print(url, flush=True)\n    time.sleep(600)\n")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    holder = subprocess.Popen([sys.executable, "-c", script], cwd=REPO, env=env, stdout=subprocess.PIPE, text=True)
    try:
        url = holder.stdout.readline().strip().removesuffix("/v1")
        assert url.startswith("http://127.0.0.1:"), url
        assert httpx.get(url + "/health", timeout=5).status_code == 200
        holder.send_signal(getattr(signal, sig))
        holder.wait(90)  # on SIGTERM it stops the server first (up to 30 s on a loaded machine)
        deadline = time.monotonic() + 60
        while True:
            try:
                httpx.get(url + "/health", timeout=1)
            except httpx.HTTPError:
                break  # nothing answers on the port: the server is gone
            assert time.monotonic() < deadline, f"the server outlived its {sig}ed parent"
            time.sleep(0.2)
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()
