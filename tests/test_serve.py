"""`cpmctl serve`: the continuous-batching engine against `generate`'s decoding, and a real uvicorn server on a
loopback port driven by the official `openai` client (completions, streaming, chat, errors, auth), a bounded load
test, the 503 queue limit, a client that disconnects, and SIGTERM draining a subprocess server."""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from cpmctl.generate.decode import encode_prompt, generate, greedy, sample
from cpmctl.model.ant import build_model
from cpmctl.model.checkpoint import load_model, save_native
from cpmctl.model.generation_config import GenerationConfig
from cpmctl.model.inputs import build_inputs
from cpmctl.model.tokenizer import EOS, CPMAntTokenizer
from cpmctl.serve import chat_template
from cpmctl.serve.engine import Engine, Limits, Sequence, max_length
from tests.conftest import REPO, run_cli, tiny_config

openai = pytest.importorskip("openai")
pytest.importorskip("uvicorn")

KEY = "sk-test-key"
PROMPTS = ["今天天气不错，", "我们的学校", "hello world 20", "北京是中国的首都，一个很大的城市。他们说", "数据",
           "老师说：学生们", "科学技术的发展", "一个"]


def sharp_checkpoint(path: Path, vocab: Path, seed: int = 3, eos: str = "never") -> Path:
    """A tiny random checkpoint with peaked next-token distributions (embeddings scaled from std 0.02 to 1, as
    tests/test_generate.py does), so that argmax decisions are far from ties. eos "never": </s> has a zero
    embedding, so it is never the best token; "often": </s> takes the place of a token that greedy decoding
    picks mid-sentence (its output embedding is that token's, a little longer), so sequences end early."""
    tokenizer = CPMAntTokenizer(vocab)
    model = build_model(tiny_config(tokenizer.vocab_size), seed=seed).eval()
    with torch.no_grad():
        weight = model.input_embedding.weight
        weight.mul_(1 / 0.02)
        if eos == "never":
            weight[EOS] = 0
        else:
            ids = generate(model, tokenizer, [PROMPTS[0]], GenerationConfig(decode="greedy", max_new_tokens=6))
            weight[EOS] = weight[ids[0].token_ids[-1]] * 1.05
    return save_native(model, path, vocab=vocab)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, tiny_vocab) -> Path:
    return sharp_checkpoint(tmp_path_factory.mktemp("serve") / "tiny", tiny_vocab)


@pytest.fixture(scope="module")
def loaded(ckpt, tiny_vocab):
    return load_model(ckpt)[0].eval(), CPMAntTokenizer(tiny_vocab)


def _server(loaded, limits: Limits, api_key=KEY):
    from cpmctl.serve.app import ServeSettings, create_app
    from cpmctl.serve.server import ServerThread

    model, tokenizer = loaded
    records: list[dict] = []
    app = create_app(Engine(model, tokenizer, limits), ServeSettings("tiny", api_key, records.append))
    server = ServerThread(app).start()
    server.records = records
    return server


@pytest.fixture(scope="module")
def server(loaded):
    s = _server(loaded, Limits(max_batch=4, max_queue=64, max_prompt_tokens=40, max_new_tokens=600))
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)


def _generate_cli(capsys, ckpt, prompt, *flags) -> dict:
    code, out, err = run_cli(capsys, "generate", prompt, "--model", ckpt, "--device", "cpu", "--json", *flags)
    assert code == 0, err
    return json.loads(out)


def _raw(server, method, path, body=None, key=KEY):
    host, port = server.url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    conn.request(method, path, body=None if body is None else json.dumps(body), headers=headers)
    return conn, conn.getresponse()


def _metrics(server) -> dict[str, float]:
    conn, resp = _raw(server, "GET", "/metrics")
    text = resp.read().decode()
    conn.close()
    samples = {}
    for line in text.splitlines():
        if line.startswith("#"):
            assert re.fullmatch(r"# (HELP|TYPE) cpmctl_\w+ .+", line), line
            continue
        name, value = line.rsplit(" ", 1)
        samples[name] = float(value)
    return samples


# ----- the engine, without HTTP --------------------------------------------------------------------------------------
def test_engine_joins_and_leaves_with_generates_ids(tmp_path, tiny_vocab):
    """Sequences joining a running batch at every step (longer prompts moving the rows right, the rows moving left
    when the cache position reaches the capacity, sequences ending at </s> or their limit) decode to the ids
    `generate` gives each prompt alone: greedy, repetition penalty, and seeded sampling."""
    model = load_model(sharp_checkpoint(tmp_path / "eos", tiny_vocab, seed=5, eos="often"))[0].eval()
    tokenizer = CPMAntTokenizer(tiny_vocab)
    limits = Limits(max_batch=3, max_queue=64, max_prompt_tokens=24, max_new_tokens=30)
    engine = Engine(model, tokenizer, limits, capacity=max_length(model.config.prompt_length, limits) + 6).start()
    assert engine._fast_step is not None  # the steps below go through generate/step.py's DecodeStep
    seqs = []
    try:
        # Which moves happen depends on when each request lands between steps; on a loaded machine a round can
        # miss one, so up to three rounds (the later ones spaced wider) run until both have happened.
        for spacing in (0.002, 0.01, 0.03):
            for i in range(18):
                ids = encode_prompt(tokenizer, PROMPTS[i % len(PROMPTS)] * (1 + i % 3))[:24]
                cfg = GenerationConfig(decode="sample" if i % 3 == 1 else "greedy", max_new_tokens=8 + (7 * i) % 23,
                                       seed=i, temperature=1.5, top_p=1.0,
                                       repetition_penalty=1.3 if i % 4 == 0 else 1.0)
                seq = Sequence(ids, cfg)
                engine.submit([seq])
                seqs.append((seq, cfg))
                time.sleep(spacing * (i % 3))
            deadline = time.monotonic() + 60
            while not all(s.done for s, _ in seqs) and time.monotonic() < deadline:
                time.sleep(0.01)
            if engine.slots.moves["right"] > 0 and engine.slots.moves["left"] > 0:
                break
    finally:
        engine.close()
    assert engine.slots.moves["right"] > 0 and engine.slots.moves["left"] > 0  # both paths ran
    reasons = {s.finish_reason for s, _ in seqs}
    assert reasons == {"stop", "length"}
    for seq, cfg in seqs:  # generate()'s loops on the same prompt ids, alone
        [alone] = (sample if cfg.decode == "sample" else greedy)(model, build_inputs(model, [seq.prompt_ids]), cfg)
        assert seq.tokens == alone, cfg
        assert seq.text == tokenizer.decode(alone)
    sampled = [(s.prompt_ids, s.tokens) for s, c in seqs if c.decode == "sample"]
    as_greedy = [greedy(model, build_inputs(model, [ids]), GenerationConfig(decode="greedy",
                                                                            max_new_tokens=len(tokens)))[0]
                 for ids, tokens in sampled]
    assert [t for _, t in sampled] != as_greedy  # sampling really draws here


def test_engine_under_a_memory_limit_streams_and_decodes_the_same(ckpt, loaded):
    """--memory-limit: the engine's shape is planned (blocks stream) and the ids are those of the plain load."""
    from cpmctl.serve.load import engine_plan, load_for_serving

    model, tokenizer = loaded
    limits = Limits(max_batch=2, max_queue=8, max_prompt_tokens=32, max_new_tokens=16)
    full = engine_plan(model.config, limits, torch.device("cpu"), torch.float32, None, None)
    limit_gb = (full.minimum_bytes + max(full.block_bytes) // 2) / 1e9  # room for one block at most
    served = load_for_serving(ckpt, limits, device=torch.device("cpu"), dtype=torch.float32, memory_limit_gb=limit_gb)
    assert served.plan.streamed and served.plan.batch_rows == 4 and served.name == "tiny"
    cfg = GenerationConfig(decode="greedy", max_new_tokens=16)
    engine = Engine(served.loaded.model, served.loaded.tokenizer, limits).start()
    try:
        seqs = [Sequence(encode_prompt(tokenizer, p), cfg) for p in PROMPTS[:3]]
        engine.submit(seqs)
        while not all(s.done for s in seqs):
            time.sleep(0.01)
    finally:
        engine.close()
        served.loaded.close()
    assert [s.tokens for s in seqs] == [r.token_ids for r in generate(model, tokenizer, PROMPTS[:3], cfg)]


def test_an_adapter_is_served_unmerged_and_refused_with_a_memory_limit(ckpt, loaded, tmp_path):
    from cpmctl import CpmctlError
    from cpmctl.model import lora
    from cpmctl.serve.load import load_for_serving

    model, tokenizer = loaded
    tuned = lora.inject_lora(load_model(ckpt)[0], lora.LoraSettings())
    with torch.no_grad():
        for name, p in tuned.named_parameters():
            if lora.is_lora_parameter(name):
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1)) * 0.5)
    lora.save_adapter(tuned, tmp_path / "adapter", lora.LoraSettings())
    limits = Limits(max_batch=2, max_queue=4, max_prompt_tokens=32, max_new_tokens=12)
    cfg = GenerationConfig(decode="greedy", max_new_tokens=12)
    served = load_for_serving(ckpt, limits, device=torch.device("cpu"), dtype=torch.float32,
                              adapter=tmp_path / "adapter")
    engine = Engine(served.loaded.model, served.loaded.tokenizer, limits).start()
    try:
        seq = Sequence(encode_prompt(tokenizer, PROMPTS[0]), cfg)
        engine.submit([seq])
        while not seq.done:
            time.sleep(0.01)
    finally:
        engine.close()
    assert seq.tokens == generate(tuned.eval(), tokenizer, [PROMPTS[0]], cfg)[0].token_ids
    assert seq.tokens != generate(model, tokenizer, [PROMPTS[0]], cfg)[0].token_ids  # the adapter matters here
    with pytest.raises(CpmctlError, match="merge the adapter first"):
        load_for_serving(ckpt, limits, device=torch.device("cpu"), dtype=torch.float32, adapter=tmp_path / "adapter",
                         memory_limit_gb=1.0)


# ----- the HTTP server, through the openai client --------------------------------------------------------------------
def test_greedy_completions_equal_cpmctl_generate(client, ckpt, loaded, capsys):
    for prompt in PROMPTS[:3]:
        expected = _generate_cli(capsys, ckpt, prompt, "--decode", "greedy", "--max-new-tokens", "12")
        got = client.completions.create(model="tiny", prompt=prompt, max_tokens=12, temperature=0,
                                        extra_body={"return_token_ids": True})
        choice = got.choices[0]
        assert choice.token_ids == expected["token_ids"] and choice.text == expected["text"]
        assert choice.finish_reason == "length"
        assert got.usage.completion_tokens == 12
        assert got.usage.prompt_tokens == len(encode_prompt(loaded[1], prompt))  # <s> + the prompt's ids
    # A list of prompts: one choice per prompt, in order, each its own decoding.
    many = client.completions.create(model="tiny", prompt=PROMPTS[:3], max_tokens=12, temperature=0)
    assert [c.index for c in many.choices] == [0, 1, 2]
    alone = [client.completions.create(model="tiny", prompt=p, max_tokens=12, temperature=0).choices[0].text
             for p in PROMPTS[:3]]
    assert [c.text for c in many.choices] == alone


def test_seeded_sampling_and_beam_equal_cpmctl_generate(client, ckpt, capsys):
    expected = _generate_cli(capsys, ckpt, PROMPTS[0], "--decode", "sample", "--seed", "7", "--temperature", "1.5",
                             "--top-p", "1.0", "--top-k", "20", "--max-new-tokens", "10")
    kwargs = dict(model="tiny", prompt=PROMPTS[0], max_tokens=10, temperature=1.5, top_p=1.0, seed=7,
                  extra_body={"top_k": 20, "return_token_ids": True})
    assert client.completions.create(**kwargs).choices[0].token_ids == expected["token_ids"]
    assert client.completions.create(**kwargs).choices[0].token_ids == expected["token_ids"]  # reproducible
    beam = _generate_cli(capsys, ckpt, PROMPTS[1], "--decode", "beam", "--beam-size", "2", "--max-new-tokens", "6")
    with ThreadPoolExecutor(3) as pool:  # beam requests arriving together run as one beam batch
        got = list(pool.map(lambda _: client.completions.create(
            model="tiny", prompt=PROMPTS[1], max_tokens=6, extra_body={"decode": "beam", "beam_size": 2,
                                                                       "return_token_ids": True}), range(3)))
    assert all(g.choices[0].token_ids == beam["token_ids"] for g in got)


def test_streaming_chunks_concatenate_to_the_whole_text(client):
    whole = client.completions.create(model="tiny", prompt=PROMPTS[3], max_tokens=20, temperature=0)
    chunks = list(client.completions.create(model="tiny", prompt=PROMPTS[3], max_tokens=20, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == whole.choices[0].text and len(chunks) >= 20
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 20
    # A stop string cuts the text, streamed or not, and the two still agree.
    stop = whole.choices[0].text[5:7]
    cut = client.completions.create(model="tiny", prompt=PROMPTS[3], max_tokens=20, temperature=0, stop=[stop])
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="tiny", prompt=PROMPTS[3], max_tokens=20, temperature=0, stop=[stop], stream=True))
    assert cut.choices[0].text == streamed == whole.choices[0].text[: whole.choices[0].text.index(stop)]
    assert cut.choices[0].finish_reason == "stop"


def test_chat_uses_the_template_and_streams(client, ckpt, capsys):
    messages = [{"role": "system", "content": "你是一个助手"}, {"role": "user", "content": "今天天气"},
                {"role": "assistant", "content": "不错"}, {"role": "user", "content": "我们去学校"}]
    prompt = chat_template.render([(m["role"], m["content"]) for m in messages])
    assert prompt == "你是一个助手\n用户：今天天气\n助手：不错\n用户：我们去学校\n助手："
    expected = _generate_cli(capsys, ckpt, prompt, "--decode", "greedy", "--max-new-tokens", "15")
    reply = client.chat.completions.create(model="tiny", messages=messages, max_tokens=15, temperature=0)
    assert reply.choices[0].message.role == "assistant"
    assert reply.choices[0].message.content == expected["text"]
    chunks = list(client.chat.completions.create(model="tiny", messages=messages, max_tokens=15, temperature=0,
                                                 stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected["text"]
    assert chunks[-1].choices[0].finish_reason == "length"


def test_bad_requests_name_the_field(client, server):
    cases = [
        (dict(max_tokens=601), "max_tokens"),
        (dict(temperature=3), "temperature"),
        (dict(top_p=0), "top_p"),
        (dict(n=2), "n"),
        (dict(prompt="今天" * 60), "prompt"),  # over --max-prompt-tokens 40
        (dict(prompt=""), "prompt"),
        (dict(extra_body={"beam_size": 0, "decode": "beam"}), "beam_size"),
        (dict(extra_body={"decode": "nucleus"}), "decode"),
        (dict(extra_body={"surprise": 1}), "surprise"),
        (dict(temperature=0, top_p=0.5), "top_p"),  # greedy: a sampling knob would do nothing
        (dict(stop=["a", "b", "c", "d", "e"]), "stop"),
    ]
    for change, param in cases:
        kwargs = dict(model="tiny", prompt="今天", max_tokens=4)
        kwargs.update(change)
        with pytest.raises(openai.BadRequestError) as e:
            client.completions.create(**kwargs)
        assert e.value.status_code == 400 and e.value.body["param"] == param, (change, e.value.body)
        assert param in e.value.body["message"]
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="other", prompt="今天", max_tokens=4)
    assert e.value.body["param"] == "model"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=[{"role": "robot", "content": "x"}])
    assert e.value.body["param"] == "messages"
    conn, resp = _raw(server, "POST", "/v1/completions")  # no body at all
    assert resp.status == 400 and "JSON" in json.loads(resp.read())["error"]["message"]
    conn.close()


def test_api_key_is_required_and_health_is_open(server):
    wrong = openai.OpenAI(base_url=server.url + "/v1", api_key="sk-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as e:
        wrong.completions.create(model="tiny", prompt="今天", max_tokens=2)
    assert e.value.status_code == 401 and e.value.body["code"] == "invalid_api_key"
    for key in (None, "sk-wrong"):
        for method, path in (("POST", "/v1/completions"), ("POST", "/v1/chat/completions"), ("GET", "/v1/models"),
                             ("GET", "/metrics")):
            conn, resp = _raw(server, method, path, dict(model="tiny", prompt="今天") if method == "POST" else None,
                              key=key)
            assert resp.status == 401 and resp.getheader("WWW-Authenticate") == "Bearer", (path, key)
            conn.close()
    conn, resp = _raw(server, "GET", "/health", key=None)
    assert resp.status == 200 and json.loads(resp.read())["status"] == "ok"
    conn.close()
    keyed = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)
    assert [m.id for m in keyed.models.list()] == ["tiny"]


def test_load_every_request_answered_with_its_own_output(client, server, loaded):
    """48 requests, 12 at a time, of 8 prompts with different lengths and limits: each greedy output equals the
    prompt's output decoded alone, each seeded sample equals the same request's sample decoded alone."""
    model, tokenizer = loaded
    jobs = []
    for i in range(48):
        sample = i % 4 == 3
        jobs.append(dict(prompt=PROMPTS[i % 8], max_tokens=4 + (5 * i) % 29,
                         **(dict(temperature=1.5, top_p=1.0, seed=i) if sample else dict(temperature=0))))
    expected = []
    for job in jobs:
        cfg = GenerationConfig(decode="sample" if "seed" in job else "greedy", max_new_tokens=job["max_tokens"],
                               temperature=job.get("temperature") or 0.9, top_p=job.get("top_p", 0.9),
                               seed=job.get("seed"))
        expected.append(generate(model, tokenizer, [job["prompt"]], cfg)[0].token_ids)
    before = _metrics(server)
    start = time.monotonic()
    with ThreadPoolExecutor(12) as pool:
        got = list(pool.map(lambda job: client.completions.create(
            model="tiny", extra_body={"return_token_ids": True}, **job), jobs))
    elapsed = time.monotonic() - start
    assert [g.choices[0].token_ids for g in got] == expected
    after = _metrics(server)
    key = 'cpmctl_requests_total{endpoint="/v1/completions",status="200"}'
    assert after[key] - before.get(key, 0) == 48
    generated = sum(len(e) for e in expected)
    assert after["cpmctl_generation_tokens_total"] - before["cpmctl_generation_tokens_total"] == generated
    assert after["cpmctl_request_latency_seconds_count"] - before["cpmctl_request_latency_seconds_count"] == 48
    buckets = [v for k, v in after.items() if k.startswith("cpmctl_request_latency_seconds_bucket")]
    assert buckets == sorted(buckets) and buckets[-1] == after["cpmctl_request_latency_seconds_count"]
    assert elapsed < 60


def test_queue_limit_answers_503(loaded):
    """One running sequence, one waiting: a third request is refused with 503 and Retry-After."""
    small = _server(loaded, Limits(max_batch=1, max_queue=1, max_prompt_tokens=40, max_new_tokens=600))
    try:
        c = openai.OpenAI(base_url=small.url + "/v1", api_key=KEY, max_retries=0, timeout=60)
        first = c.completions.create(model="tiny", prompt="今天", max_tokens=600, temperature=0, stream=True)
        pieces = [next(iter(first)).choices[0].text]  # running now, with 599 tokens to go
        second = c.completions.create(model="tiny", prompt="我们", max_tokens=5, temperature=0, stream=True)
        with pytest.raises(openai.APIStatusError) as e:
            c.completions.create(model="tiny", prompt="北京", max_tokens=5, temperature=0)
        assert e.value.status_code == 503 and e.value.response.headers["retry-after"] == "1"
        pieces += [ch.choices[0].text for ch in first]
        assert len(pieces) == 600 + 1  # every token, then the chunk with the finish reason
        assert "".join(ch.choices[0].text for ch in second)  # the waiting one is answered after the first
        deadline = time.monotonic() + 10  # a streamed response is logged when the server closes it, just after
        while len(small.records) < 3 and time.monotonic() < deadline:  # the client has read its last chunk
            time.sleep(0.05)
        assert sorted(r["status"] for r in small.records) == [200, 200, 503]
    finally:
        small.stop()


def test_a_client_that_leaves_has_its_sequence_cancelled(server):
    before = _metrics(server).get('cpmctl_sequences_total{finish_reason="cancelled"}', 0)
    conn, resp = _raw(server, "POST", "/v1/completions",
                      dict(model="tiny", prompt="今天", max_tokens=600, temperature=0, stream=True))
    assert resp.status == 200
    assert resp.readline().startswith(b"data: ")
    conn.sock.shutdown(2)
    conn.close()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        conn, resp = _raw(server, "GET", "/health")
        health = json.loads(resp.read())
        conn.close()
        if health["running"] == 0:
            break
        time.sleep(0.05)
    assert health["running"] == 0
    assert _metrics(server)['cpmctl_sequences_total{finish_reason="cancelled"}'] == before + 1


# ----- the command -----------------------------------------------------------------------------------------------
def test_sigterm_drains_the_request_in_flight_then_exits(ckpt):
    env = dict(os.environ, CPMCTL_API_KEY=KEY, PYTHONPATH=str(REPO))
    proc = subprocess.Popen([sys.executable, "-m", "cpmctl", "serve", "--model", str(ckpt), "--port", "0",
                             "--device", "cpu", "--max-tokens", "600", "--json"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True)
    try:
        banner = json.loads(proc.stdout.readline())
        assert banner["api_key_required"] and banner["model"] == "tiny" and banner["plan"]["cache_bytes"] > 0
        assert "curl" in banner["example"]
        url = banner["url"].removeprefix("http://").removesuffix("/v1")
        host, port = url.split(":")
        conn = http.client.HTTPConnection(host, int(port), timeout=30)
        conn.request("POST", "/v1/completions", json.dumps(dict(model="tiny", prompt="今天", max_tokens=300,
                                                                  temperature=0, stream=True)),
                     {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
        resp = conn.getresponse()
        lines = [resp.readline()]
        proc.send_signal(signal.SIGTERM)
        lines += resp.read().split(b"\n")
        events = [json.loads(l[6:]) for l in lines if l.startswith(b"data: {")]
        assert b"data: [DONE]" in b"\n".join(lines)
        assert events[-1]["choices"][0]["finish_reason"] == "length"
        assert sum(1 for e in events if e["choices"][0]["text"]) == 300  # every token came before the exit
        assert proc.wait(timeout=30) == 0
        rest = proc.stdout.read().strip().splitlines()
        assert json.loads(rest[-1]) == {"stopped": "SIGTERM", "requests": 1}
        log = [json.loads(l) for l in proc.stderr.read().splitlines() if l.startswith("{")]
        assert log[-1]["status"] == 200 and log[-1]["completion_tokens"] == 300
        with pytest.raises(ConnectionRefusedError):
            http.client.HTTPConnection(host, int(port), timeout=5).request("GET", "/health")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_missing_serving_stack_names_the_extra(capsys, monkeypatch, ckpt):
    monkeypatch.setitem(sys.modules, "uvicorn", None)  # `import uvicorn` now raises ImportError
    code, _, err = run_cli(capsys, "serve", "--model", ckpt, "--device", "cpu", "--port", "0")
    assert code == 2 and "pip install 'cpmctl[serve]'" in err and "uvicorn" in err
