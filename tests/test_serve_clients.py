"""Clients nobody here wrote against `chimera serve` (lm-evaluation-harness, offline), chimera's own endpoint
client against `chimera serve` and `transformers serve`, and the client's retries on a misbehaving server."""
from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

import served
from chimera.errors import ChimeraError
from chimera.eval import harness, scorers, suites
from chimera.eval.endpoint import Endpoint


@pytest.fixture(scope="module")
def local():
    return harness.load("tiny-r1")


@pytest.fixture(scope="module")
def transformers_server():
    """`transformers serve` (pip transformers[serving]) with the bundled tiny-r1, float32 on CPU."""
    pytest.importorskip("fastapi")
    from chimera.zoo.family import model_path

    port = served.free_port()
    exe = os.path.join(os.path.dirname(sys.executable), "transformers")
    s = served.Served([exe, "serve", str(model_path("tiny-r1")), "--port", str(port), "--dtype", "float32",
                       "--device", "cpu"], port, "/health")
    yield s, str(model_path("tiny-r1"))
    s.stop()


# ------------------------------------------------------------------------------------ lm-evaluation-harness
TASK = """task: chimera_arith
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "{{{{prompt}}}}"
doc_to_target: "{{{{target}}}}"
generation_kwargs:
  until: ["\\n\\n"]
  max_gen_toks: 160
  do_sample: false
  temperature: 0
filter_list:
  - name: answer
    filter:
      - function: regex
        regex_pattern: "answer is (\\\\d+)"
      - function: take_first
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
"""


def test_lm_eval_local_chat_completions_offline(chimera_server, local, tmp_path, monkeypatch):
    """lm-eval's `local-chat-completions` model on a local task file, no network: the answers it logs are the
    in-process answers, and its exact_match is the harness's accuracy on the same items."""
    for var in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.setenv(var, "1")
    monkeypatch.setenv("OPENAI_API_KEY", served.API_KEY)
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager

    items = suites.sample(suites.load("arithmetic"), 8)
    data = tmp_path / "items.jsonl"
    data.write_text("".join(json.dumps({"prompt": it["prompt"], "target": it["answer"]}) + "\n"
                            for it in items))
    (tmp_path / "chimera_arith.yaml").write_text(TASK.format(data=data))
    out = lm_eval.simple_evaluate(
        model="local-chat-completions",
        model_args=f"model=tiny-r1,base_url={chimera_server.url}/v1/chat/completions,num_concurrent=4,max_retries=1",
        tasks=["chimera_arith"], task_manager=TaskManager(include_path=str(tmp_path), include_defaults=False),
        apply_chat_template=True, log_samples=True)
    samples = sorted(out["samples"]["chimera_arith"], key=lambda s: s["doc_id"])
    model, tok = local
    want = harness.generate(model, tok, [it["prompt"] for it in items], max_new_tokens=160)
    assert [s["resps"][0][0].strip() for s in samples] == want
    acc = sum(bool(scorers.accuracy(t, it)) for t, it in zip(want, items)) / len(items)
    assert out["results"]["chimera_arith"]["exact_match,answer"] == pytest.approx(acc)
    assert acc > 0


# ------------------------------------------------------------------------------------ token counts
def test_endpoint_and_in_process_count_tokens_alike(chimera_server, transformers_server, local):
    model, tok = local
    here = harness.evaluate(model, tok, "arithmetic", n=6, keep_responses=True, max_new_tokens=64)["arithmetic"]
    remotes = {
        "chimera serve chat": Endpoint(chimera_server.url + "/v1", model="tiny-r1", api_key=served.API_KEY),
        "chimera serve completions": Endpoint(chimera_server.url + "/v1/completions", model="tiny-r1",
                                              api_key=served.API_KEY),
        "transformers serve chat": Endpoint(transformers_server[0].url + "/v1/chat/completions",
                                            model=transformers_server[1], workers=1),
    }
    for name, ep in remotes.items():
        if not ep.chat:  # the raw prompt is the chat-formatted one, so both sides see the same tokens
            texts = [harness.format_prompt(tok, r["prompt"]) for r in here["responses"]]
            got_t, got_n = ep.generate(texts, 64)
            want_t, want_n = harness.generate_counted(model, tok, texts, 64, chat=False)
            assert (got_t, got_n) == (want_t, want_n), name
            continue
        there = harness.evaluate(ep, None, "arithmetic", n=6, keep_responses=True, max_new_tokens=64)["arithmetic"]
        assert [r["response"] for r in there["responses"]] == [r["response"] for r in here["responses"]], name
        assert [r["tokens"] for r in there["responses"]] == [r["tokens"] for r in here["responses"]], name
        assert there["metrics"]["output_tokens_mean"]["value"] == here["metrics"]["output_tokens_mean"]["value"]


# ------------------------------------------------------------------------------------ retries, limits
class Flaky(BaseHTTPRequestHandler):
    """Answers the first requests with 429 / 503 / a dropped connection, then with a completion; records the
    most requests it ever had in flight."""

    script: list = []
    lock = threading.Lock()
    calls = 0
    inflight = 0
    peak = 0
    delay = 0.0

    def log_message(self, *a):
        pass

    def do_POST(self):
        cls = type(self)
        self.rfile.read(int(self.headers["Content-Length"]))
        with cls.lock:
            cls.calls += 1
            step = cls.script.pop(0) if cls.script else "ok"
            cls.inflight += 1
            cls.peak = max(cls.peak, cls.inflight)
        try:
            time.sleep(cls.delay)
            if step == "reset":
                self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
                self.connection.close()
                return
            if isinstance(step, int):
                self.send_response(step)
                self.send_header("Retry-After", "0")
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"{}")
                return
            data = json.dumps({"choices": [{"index": 0, "message": {"content": " 42 "}, "finish_reason": "stop"}],
                               "usage": {"completion_tokens": 3}}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        finally:
            with cls.lock:
                cls.inflight -= 1


@pytest.fixture()
def flaky():
    Flaky.script, Flaky.calls, Flaky.peak, Flaky.delay = [], 0, 0, 0.0
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Flaky)
    httpd.handle_error = lambda *a: None  # clients that gave up (the timeout test) break the pipe
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/v1/chat/completions"
    httpd.shutdown()
    httpd.server_close()


def test_endpoint_retries_429_5xx_and_resets(flaky):
    Flaky.script = [429, 503, "reset", 500]
    ep = Endpoint(flaky, retries=5, backoff=0.01)
    assert ep.complete("x") == ("42", 2)  # 3 completion tokens, the last one the end of sequence
    assert Flaky.calls == 5
    Flaky.script, Flaky.calls = [503] * 10, 0
    with pytest.raises(ChimeraError, match="HTTP 503"):
        Endpoint(flaky, retries=2, backoff=0.01).complete("x")
    assert Flaky.calls == 3
    Flaky.script, Flaky.calls = [400], 0
    with pytest.raises(ChimeraError, match="HTTP 400"):
        Endpoint(flaky, retries=3, backoff=0.01).complete("x")
    assert Flaky.calls == 1  # a client error is not retried


def test_endpoint_timeout_and_concurrency_limit(flaky):
    Flaky.delay = 0.5
    with pytest.raises(ChimeraError, match="ReadTimeout.*2 attempts"):
        Endpoint(flaky, timeout=0.1, retries=1, backoff=0.01).complete("x")
    time.sleep(0.6)  # let the abandoned requests finish on the server side
    Flaky.delay, Flaky.calls, Flaky.peak = 0.05, 0, 0
    texts, counts = Endpoint(flaky, workers=3).generate([f"p{i}" for i in range(12)])
    assert texts == ["42"] * 12 and counts == [2] * 12
    assert Flaky.calls == 12 and 2 <= Flaky.peak <= 3, (Flaky.calls, Flaky.peak)
