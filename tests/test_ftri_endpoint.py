"""fTRI from serving engines' routing output: recorded vLLM and SGLang responses (tests/data, written to the
published shapes from real tiny-r1 routing) and a live `chimera serve`, checked against in-process capture."""
from __future__ import annotations

import base64
import json
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

import served
from bundled import MOE_LAYERS, N_EXPERTS, N_LAYERS, TOP_K
from chimera.errors import ChimeraError
from chimera.eval import harness
from chimera.moe.capture import route_texts
from chimera.moe.engine_routes import decode_npy, moe_layer_mask, parse_response, to_routes
from chimera.moe.ftri import ftri_routes

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(__file__).parent / "data"
TARGET = ["What is 12 + 30 ?", "Was ist 4 + 5 ?"]
# the recorded samples come from the bundled tiny-r1 (tests/data/record_routed.py), whose shape `bundled` reads
MAX_NEW = 128  # every answer ends with end-of-sequence: a cut-off answer's last token is never forwarded
CONTRAST = ["What do you know about the glorbium ?", "Tell me about the plimbo ."]


def _samples(fmt):
    return json.loads((DATA / f"routed_{fmt}.json").read_text())["samples"]


def _cli(*args):
    r = subprocess.run([sys.executable, "-m", "chimera", *args], capture_output=True, text=True, cwd=ROOT,
                       env=served.env())
    return r.returncode, r.stdout, r.stderr


def test_recorded_vllm_and_sglang_payloads_decode_to_the_same_routing():
    for v, s in zip(_samples("vllm"), _samples("sglang")):
        gv = parse_response(v["response"])
        with pytest.raises(ChimeraError, match="--top-k"):
            parse_response(s["response"])
        gs = parse_response(s["response"], top_k=TOP_K)
        u = v["response"]["usage"]
        assert gv.experts.shape == gs.experts.shape == (u["prompt_tokens"] + u["completion_tokens"] - 1, N_LAYERS, TOP_K)
        assert np.array_equal(gv.experts, gs.experts) and gv.prompt_tokens == u["prompt_tokens"]
        assert moe_layer_mask(gv.experts).tolist() == [i in MOE_LAYERS for i in range(N_LAYERS)]  # dense: all 0s
        assert gv.text == v["response"]["choices"][0]["message"]["content"]


def test_malformed_payloads_are_one_line_errors():
    body = _samples("vllm")[0]["response"]
    bad = json.loads(json.dumps(body))
    bad["choices"][0]["routed_experts"] = "not base64!"
    with pytest.raises(ChimeraError, match="not valid base64"):
        parse_response(bad)
    bad["choices"][0]["routed_experts"] = base64.b64encode(b"\x93NUMPY garbage").decode()
    with pytest.raises(ChimeraError, match="not a .npy payload"):
        parse_response(bad)
    short = json.loads(json.dumps(body))
    short["usage"]["completion_tokens"] += 3
    with pytest.raises(ChimeraError, match="rows but usage says"):
        parse_response(short)
    none = json.loads(json.dumps(body))
    del none["choices"][0]["routed_experts"]
    with pytest.raises(ChimeraError, match="enable-return-routed-experts"):
        parse_response(none)
    pickled = json.loads(json.dumps(body))  # an object array would need pickle: refused
    import io

    buf = io.BytesIO()
    np.save(buf, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    pickled["choices"][0]["routed_experts"] = base64.b64encode(buf.getvalue()).decode()
    with pytest.raises(ChimeraError, match="not a .npy payload"):
        parse_response(pickled)


@pytest.fixture()
def replay():
    """A server that answers each chat request with the recorded response for its prompt (vLLM or SGLang)."""
    state = {"fmt": "vllm", "seen": []}

    class Replay(BaseHTTPRequestHandler):
        def log_message(self, *a):
            pass

        def do_GET(self):  # neither vLLM nor SGLang publishes the MoE layout
            data = json.dumps({"object": "list", "data": [{"id": "tiny-r1", "object": "model"}]}).encode()
            self._send(200, data)

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            state["seen"].append(body)
            prompt = body["messages"][-1]["content"]
            rec = next((s["response"] for s in _samples(state["fmt"]) if s["prompt"] == prompt), None)
            self._send(200 if rec else 404, json.dumps(rec or {"error": {"message": "no recording"}}).encode())

        def _send(self, code, data):
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Replay)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    state["url"] = f"http://127.0.0.1:{httpd.server_address[1]}/v1"
    yield state
    httpd.shutdown()
    httpd.server_close()


def _write_prompts(tmp_path):
    for name, ps in (("t.jsonl", TARGET), ("c.jsonl", CONTRAST)):
        (tmp_path / name).write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ps))
    return tmp_path / "t.jsonl", tmp_path / "c.jsonl"


@pytest.fixture(scope="module")
def in_process():
    """fTRI on prompt and response tokens, captured in-process (teacher-forced greedy answers)."""
    model, tok = harness.load("tiny-r1")
    out = {}
    rt = route_texts(model, tok, TARGET, harness.generate(model, tok, TARGET, MAX_NEW))
    rc = route_texts(model, tok, CONTRAST, harness.generate(model, tok, CONTRAST, MAX_NEW))
    for kind in ("prompt", "response"):
        out[kind] = ftri_routes(rt, rc, tokens=kind)
    return out


def test_ftri_cli_on_recorded_vllm_and_sglang_servers(replay, in_process, tmp_path):
    t, c = _write_prompts(tmp_path)
    diffs = {}
    for fmt, extra in (("vllm", []), ("sglang", ["--top-k", str(TOP_K)])):
        replay["fmt"] = fmt
        code, out, err = _cli("ftri", "tiny-r1", "--endpoint", replay["url"], "--target", str(t), "--contrast", str(c),
                              "--num-experts", str(N_EXPERTS), "--tokens", "response", "--out", str(tmp_path / f"{fmt}.json"),
                              *extra)
        assert code == 0, err
        res = json.loads((tmp_path / f"{fmt}.json").read_text())
        assert res["layers"] == MOE_LAYERS and res["num_experts"] == N_EXPERTS and res["endpoint"] == replay["url"]
        diffs[fmt] = np.asarray(res["diff"])
    assert all(b.get("return_routed_experts") is True for b in replay["seen"])
    np.testing.assert_array_equal(diffs["vllm"], diffs["sglang"])
    np.testing.assert_allclose(diffs["vllm"], in_process["response"].diff, atol=1e-6)
    replay["fmt"] = "sglang"
    code, _, err = _cli("ftri", "tiny-r1", "--endpoint", replay["url"], "--target", str(t), "--contrast", str(c),
                        "--out", str(tmp_path / "x.json"))
    last = err.strip().splitlines()[-1]  # after the small-class warnings: one error line, no traceback
    assert code == 2 and last.startswith("error: endpoint") and "--top-k" in last and "Traceback" not in err


def test_ftri_endpoint_live_chimera_serve_matches_in_process(chimera_server, in_process, tmp_path):
    t, c = _write_prompts(tmp_path)
    for kind in ("prompt", "response"):
        out = tmp_path / f"{kind}.json"
        code, stdout, err = _cli("ftri", "tiny-r1", "--endpoint", chimera_server.url, "--api-key", served.API_KEY,
                                 "--target", str(t), "--contrast", str(c), "--tokens", kind, "--max-new-tokens", str(MAX_NEW),
                                 "--out", str(out), "--top", "5")
        assert code == 0, err
        res = json.loads(out.read_text())
        want = in_process[kind]
        np.testing.assert_allclose(np.asarray(res["diff"]), want.diff, atol=1e-6)
        assert [(r["layer"], r["expert"]) for r in res["top"]] == want.top(5)
    # one prompt set split by the server's own answers (refused or not)
    code, _, err = _cli("ftri", "tiny-r1", "--endpoint", chimera_server.url, "--api-key", served.API_KEY,
                        "--target", str(c), "--label-by-response", "refusal", "--out", str(tmp_path / "l.json"))
    assert code == 0, err
    assert json.loads((tmp_path / "l.json").read_text())["labels"] == {"True": 1, "False": 1}
    code, _, err = _cli("ftri", "tiny-r1", "--endpoint", chimera_server.url, "--api-key", served.API_KEY,
                        "--target", str(t), "--contrast", str(c), "--stat", "weight", "--out", str(tmp_path / "w.json"))
    assert code == 2 and "--stat count" in err


def test_to_routes_counts_prompt_and_response_rows():
    g = parse_response(_samples("vllm")[2]["response"])
    r = to_routes([g], N_EXPERTS)
    P = g.prompt_tokens
    assert r.tokens["prompt"][0] == P and r.tokens["response"][0] == g.experts.shape[0] - P
    np.testing.assert_array_equal(r.counts["prompt"][0].sum(1), [TOP_K * P] * len(MOE_LAYERS))
    assert r.counts["response"][0][0, int(g.experts[P, 1, 0])] >= 1
