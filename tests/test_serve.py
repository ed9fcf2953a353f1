"""`chimera serve` as a user meets it: a real server process on a free localhost port, the official `openai`
client and plain HTTP, compared with the in-process model (the same bundled tiny-r1)."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
import torch

from chimera.eval import harness
from chimera.moe.capture import RoutingRecorder
from chimera.moe.engine_routes import decode_npy
from bundled import N_EXPERTS, N_LAYERS, TOP_K
from served import API_KEY

openai = pytest.importorskip("openai")

PROMPTS = ["What is 473 + 258 ?", "Tell me about the plimbo .", "Was ist 12 + 30 ?"]
LONG = 160  # enough for every answer to PROMPTS to end with end-of-sequence


@pytest.fixture(scope="module")
def local():
    return harness.load("tiny-r1")


@pytest.fixture(scope="module")
def client(chimera_server):
    return openai.OpenAI(base_url=chimera_server.url + "/v1", api_key=API_KEY, max_retries=0)


def _post(server, path, body, key=API_KEY):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.post(server.url + path, json=body, headers=headers, timeout=120)


def _busiest(model, tok, prompt, n):
    """The n most-chosen (layer, expert) on the prompt's tokens, in-process: switching them must matter."""
    ids = tok(harness.format_prompt(tok, prompt), add_special_tokens=False, return_tensors="pt")["input_ids"]
    with RoutingRecorder(model) as rec, torch.no_grad():
        model(ids)
    counts = []
    for L, (index, _) in rec.take().items():
        c = torch.bincount(index.reshape(-1), minlength=N_EXPERTS)
        counts += [(int(c[e]), L, e) for e in range(N_EXPERTS)]
    counts.sort(key=lambda t: (-t[0], t[1], t[2]))
    return [f"{L}:{e}" for _, L, e in counts[:n]]


# ------------------------------------------------------------------------------------------ openai client
def test_openai_client_matches_in_process_generation(client, local):
    model, tok = local
    assert [m.id for m in client.models.list().data] == ["tiny-r1"]
    want, counts = harness.generate_counted(model, tok, PROMPTS, max_new_tokens=LONG)
    for prompt, text, n in zip(PROMPTS, want, counts):
        r = client.chat.completions.create(model="tiny-r1", messages=[{"role": "user", "content": prompt}],
                                           max_tokens=LONG, temperature=0)
        assert r.choices[0].message.content.strip() == text
        assert r.choices[0].finish_reason == "stop"
        # usage counts the end-of-sequence token, as vLLM and transformers serve do; the harness does not
        assert r.usage.completion_tokens == n + 1 and r.usage.prompt_tokens > 5
    raw = harness.format_prompt(tok, PROMPTS[0])
    want_raw, _ = harness.generate_counted(model, tok, [raw], max_new_tokens=64, chat=False)
    c = client.completions.create(model="tiny-r1", prompt=raw, max_tokens=64, temperature=0)
    assert c.choices[0].text.strip() == want_raw[0]
    short = client.chat.completions.create(model="tiny-r1", messages=[{"role": "user", "content": PROMPTS[0]}],
                                           max_tokens=5)
    assert short.choices[0].finish_reason == "length" and short.usage.completion_tokens == 5
    sampled = [client.chat.completions.create(model="tiny-r1", messages=[{"role": "user", "content": PROMPTS[1]}],
                                              max_tokens=24, temperature=1.5, seed=3).choices[0].message.content
               for _ in range(2)]
    assert sampled[0] == sampled[1]  # a seed makes sampling reproducible


def test_streaming_chunks_add_up_to_the_full_answer(client):
    msgs = [{"role": "user", "content": PROMPTS[0]}]
    full = client.chat.completions.create(model="tiny-r1", messages=msgs, max_tokens=LONG)
    stream = client.chat.completions.create(model="tiny-r1", messages=msgs, max_tokens=LONG, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert len(chunks) > 10 and chunks[0].choices[0].delta.role == "assistant"
    assert text == full.choices[0].message.content
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == "stop"
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    raw = client.completions.create(model="tiny-r1", prompt="<bos><|user|> What is 2 + 3 ?<|assistant|>",
                                    max_tokens=40, stream=True)
    assert "5" in "".join(ch.choices[0].text for ch in raw)


# ------------------------------------------------------------------------------------------ switches
def test_switched_requests_at_once_equal_each_alone(chimera_server, local):
    """Different switch sets arriving together (and equal ones batched together) give exactly the text and
    routing each request gets alone."""
    model, tok = local
    hot = _busiest(model, tok, PROMPTS[0], 48)  # the tiny model shrugs off a few: 24 off change its answer
    switches = [None, {"off": hot[:24]}, {"off": hot[:24], "mode": "drop"}, {"off": hot[24:]}, {"on": ["2:0"]}]
    reqs = [(p, s) for p in PROMPTS[:2] for s in switches]

    def call(req):
        prompt, sw = req
        body = {"messages": [{"role": "user", "content": prompt}], "max_tokens": 48, "return_routed_experts": True}
        if sw is not None:
            body["experts"] = sw
        r = _post(chimera_server, "/v1/chat/completions", body)
        assert r.status_code == 200, r.text
        ch = r.json()["choices"][0]
        return ch["message"]["content"], decode_npy(ch["routed_experts"])

    alone = [call(r) for r in reqs]
    with ThreadPoolExecutor(len(reqs)) as pool:
        together = list(pool.map(call, reqs))
    for (a_text, a_routes), (t_text, t_routes), req in zip(alone, together, reqs):
        assert t_text == a_text, req
        assert np.array_equal(t_routes, a_routes), req
    # each switch changes the computation (routing), and some change the answer, or the test proves nothing
    first = alone[:len(switches)]
    assert len({r.tobytes() for _, r in first}) == len(switches)
    assert len({t for t, _ in first}) >= 2
    # replace-off experts are never chosen, in the prompt or in the answer
    routes_off = alone[1][1]
    for spec in hot[:3]:
        L, e = map(int, spec.split(":"))
        assert not (routes_off[:, L, :] == e).any()
        assert (alone[0][1][:, L, :] == e).any()
    forced = alone[4][1]
    assert (forced[:, 2, :] == 0).any(axis=1).all()


def test_tuned_checkpoint_gives_the_live_switch_text(chimera_server, local, tmp_path):
    from chimera.moe.switch import tune_checkpoint
    from chimera.zoo.family import model_path

    model, tok = local
    hot = _busiest(model, tok, PROMPTS[0], 48)  # the tiny model shrugs off fewer
    tune_checkpoint(model_path("tiny-r1"), tmp_path / "tuned", off=",".join(hot))
    tuned, ttok = harness.load(tmp_path / "tuned")
    want = harness.generate(tuned, ttok, PROMPTS, max_new_tokens=64)
    base = harness.generate(model, tok, PROMPTS, max_new_tokens=64)
    assert want != base
    for prompt, text in zip(PROMPTS, want):
        r = _post(chimera_server, "/v1/chat/completions", {"messages": [{"role": "user", "content": prompt}],
                                                           "max_tokens": 64, "experts": {"off": hot}})
        assert r.json()["choices"][0]["message"]["content"].strip() == text


def test_routed_experts_have_vllms_shape_and_the_model_routing(chimera_server, local):
    model, tok = local
    r = _post(chimera_server, "/v1/completions", {"prompt": harness.format_prompt(tok, PROMPTS[1]),
                                                  "max_tokens": 30, "return_routed_experts": True}).json()
    arr = decode_npy(r["choices"][0]["routed_experts"])
    P, G = r["usage"]["prompt_tokens"], r["usage"]["completion_tokens"]
    assert arr.shape == (P + G - 1, N_LAYERS, TOP_K)      # [forwarded tokens, decoder layers, top_k]
    assert (arr[:, 0] == -1).all() and (arr[:, 1:] >= 0).all() and (arr[:, 1:] < N_EXPERTS).all()
    ids = tok(harness.format_prompt(tok, PROMPTS[1]), add_special_tokens=True, return_tensors="pt")["input_ids"]
    with RoutingRecorder(model) as rec, torch.no_grad():
        model(ids)
    for L, (index, _) in rec.take().items():
        assert np.array_equal(np.sort(arr[:P, L], 1), np.sort(index.numpy(), 1))
    plain = _post(chimera_server, "/v1/completions", {"prompt": "What", "max_tokens": 2}).json()
    assert "routed_experts" not in plain["choices"][0]


# ------------------------------------------------------------------------------------------ bad requests
def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(chimera_server):
    msgs = [{"role": "user", "content": "What is 2 + 3 ?"}]
    cases = [
        ({"messages": msgs, "experts": {"off": ["2:99"]}}, 400, "invalid_expert", "expert 99 out of range"),
        ({"messages": msgs, "experts": {"off": ["0:1"]}}, 400, "invalid_expert", "not an MoE layer"),
        ({"messages": msgs, "experts": {"off": ["@/etc/passwd:3"]}}, 400, None, "bad expert"),
        ({"messages": msgs, "experts": {"off": ["1:1"], "mode": "sideways"}}, 400, None, "experts.mode"),
        ({"messages": msgs, "experts": ["1:1"]}, 400, None, "'experts' must be an object"),
        ({"messages": "hi"}, 400, None, "'messages'"),
        ({"messages": msgs, "max_tokens": -3}, 400, None, "max_tokens"),
        ({"messages": msgs, "n": 2}, 400, None, "n=1"),
        ({"messages": msgs, "model": "gpt-4"}, 404, "model_not_found", "does not exist"),
        ({"messages": [{"role": "user", "content": "one two " * 400}]}, 400, "context_length_exceeded", "exceeds"),
    ]
    for body, status, code, text in cases:
        r = _post(chimera_server, "/v1/chat/completions", body)
        assert r.status_code == status, (body, r.text)
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and text in err["message"], (body, err)
        if code:
            assert err["code"] == code
    r = httpx.post(chimera_server.url + "/v1/chat/completions", content=b"{not json",
                   headers={"Authorization": f"Bearer {API_KEY}"})
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    r = _post(chimera_server, "/v1/chat/completions", {"messages": msgs}, key="wrong")
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(chimera_server.url + "/v1/models").status_code == 401
    assert httpx.get(chimera_server.url + "/nope").status_code == 404
    r = _post(chimera_server, "/v1/completions", {"prompt": [5, 999999]})
    assert r.status_code == 400 and "token ids" in r.json()["error"]["message"]
    ok = _post(chimera_server, "/v1/chat/completions", {"messages": msgs, "max_tokens": 40})
    assert ok.status_code == 200 and "5" in ok.json()["choices"][0]["message"]["content"]


def test_too_many_queued_requests_get_429_then_service_resumes(chimera_server):
    body = {"messages": [{"role": "user", "content": PROMPTS[0]}], "max_tokens": 120}
    with ThreadPoolExecutor(32) as pool:
        rs = list(pool.map(lambda _: _post(chimera_server, "/v1/chat/completions", body), range(32)))
    codes = [r.status_code for r in rs]
    assert set(codes) == {200, 429}, codes
    busy = next(r for r in rs if r.status_code == 429).json()["error"]
    assert busy["code"] == "queue_full" and busy["type"] == "rate_limit_exceeded"
    texts = {r.json()["choices"][0]["message"]["content"] for r in rs if r.status_code == 200}
    assert len(texts) == 1  # the admitted ones, batched four at a time, all agree
    assert httpx.get(chimera_server.url + "/health").json()["status"] == "ok"
    ok = _post(chimera_server, "/v1/chat/completions", body)
    assert ok.status_code == 200 and ok.json()["choices"][0]["message"]["content"] in texts


def test_server_listens_on_localhost_by_default(chimera_server):
    psutil = pytest.importorskip("psutil")
    listening = [c.laddr for c in psutil.Process(chimera_server.proc.pid).net_connections(kind="inet")
                 if c.status == psutil.CONN_LISTEN]
    assert listening and all(a.ip == "127.0.0.1" for a in listening), listening
