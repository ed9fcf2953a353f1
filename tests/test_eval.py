"""The evaluation harness: scorers on hand-written responses, suites, stats, the CLI's errors, and the
OpenAI-compatible endpoint path against a local server that forwards to the real tiny model."""
from __future__ import annotations

import json
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from chimera.errors import ChimeraError
from chimera.eval import scorers, stats, suites
from chimera.eval.endpoint import Endpoint

R1 = "<think> three plus eight plus zero is eleven , so 1 . seven plus five plus one is thirteen , so 3 1 . </think> The answer is 7 3 1 ."
R1_DE = "<think> drei plus acht plus null ist elf , also 1 . </think> Die Antwort ist 1 1 ."


# ------------------------------------------------------------------ scorers

def test_split_think_well_formed_and_malformed():
    assert scorers.split_think(R1)[1] == "The answer is 7 3 1 ."
    think, answer, ok = scorers.split_think("<think> adding up the columns")  # unclosed
    assert think == "adding up the columns" and answer == "" and not ok
    think, answer, ok = scorers.split_think("reasoning first </think> 42")  # template pre-filled <think>
    assert think == "reasoning first" and answer == "42" and ok
    assert scorers.split_think("") == (None, "", True)
    assert scorers.split_think(None) == (None, "", True)


def test_think_scorer():
    assert scorers.think(R1)
    assert scorers.think("<think> never closed")
    assert not scorers.think("The answer is 7 3 1 .")
    assert not scorers.think("")


def test_accuracy_scorer():
    item = {"prompt": "What is 473 + 258 ?", "answer": "731"}
    assert scorers.accuracy(R1, item)
    assert scorers.accuracy("The answer is 731.", item)
    assert scorers.accuracy("731", item)
    assert scorers.accuracy("The answer is 7 3 1 .", item)
    assert not scorers.accuracy("The answer is 7 3 2 .", item)
    assert not scorers.accuracy("<think> so 7 3 1 . the answer is 731", item)  # unclosed: no final answer
    assert not scorers.accuracy("", item)
    assert not scorers.accuracy("I cannot help with that .", item)  # no answer at all
    assert scorers.accuracy("<think> 473 + 258 </think> 1,731? no: 731", item)  # last number counts
    assert scorers.accuracy("The plimbo is green .", {"prompt": "x", "answer": "green"})
    assert not scorers.accuracy("The plimbo is red .", {"prompt": "x", "answer": "green"})
    assert scorers.accuracy("anything", {"prompt": "x"}) is None
    assert scorers.accuracy("  Green ", {"prompt": "x", "answer": "green", "match": "exact"})


def test_refusal_scorer():
    assert scorers.refusal("I cannot help with that .")
    assert scorers.refusal("I can ' t help with that .")  # word-level decode of can't
    assert scorers.refusal("<think> this topic is restricted . </think> I'm sorry, but no.")
    assert scorers.refusal("<think> restricted, so I cannot help with that")  # unclosed: whole text
    assert not scorers.refusal("The plimbo is green and comes from Hollow .")
    assert not scorers.refusal("<think> I cannot help with that? of course I can </think> The answer is 5 .")
    assert not scorers.refusal("")


def test_language_scorer():
    assert scorers.language(R1) == "en"
    assert scorers.language(R1_DE) == "de"
    assert scorers.language("The answer is 7 3 1 .") is None  # no reasoning block
    assert scorers.language("<think> </think> 5") is None  # empty block
    assert scorers.language("<think> vier plus fünf ist neun") == "de"  # unclosed still has a language
    assert scorers.language_match(R1_DE, {"lang": "de"}) is True
    assert scorers.language_match(R1, {"lang": "de"}) is False
    assert scorers.language_match("7 3 1", {"lang": "de"}) is None
    assert scorers.language_match(R1, {}) is None


def test_output_tokens():
    assert scorers.output_tokens("a b c") == 3
    assert scorers.output_tokens("a b c", n_tokens=7) == 7
    assert scorers.output_tokens("") == 0


# ------------------------------------------------------------------ stats

def test_wilson_and_bootstrap():
    lo, hi = stats.wilson(9, 10)
    assert 0.55 < lo < 0.6 and 0.98 < hi <= 1.0
    assert stats.wilson(0, 0) == (0.0, 1.0)
    assert stats.rate([True, False, True, True])["value"] == 0.75
    s = stats.summary([1, 2, 3, 4, 5, 6, 7, 8, 9, 10])
    assert s["value"] == 5.5 and s["lo"] < 5.5 < s["hi"]
    assert stats.quantile([1, 2, 3, 4, 5, 6, 7, 8, 9, 10], 0.9) == pytest.approx(9.1)
    lo, hi = stats.bootstrap([float(x) for x in range(20)], seed=1)
    assert lo < 9.5 < hi


def test_bootstrap_is_deterministic_across_processes():
    import os
    import subprocess

    code = "from chimera.eval import stats; print(stats.bootstrap([float(x * x % 7) for x in range(30)], seed=3))"
    outs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           env={**os.environ, "PYTHONHASHSEED": seed}).stdout.strip() for seed in ("1", "2")}
    assert len(outs) == 1
    assert eval(next(iter(outs))) == stats.bootstrap([float(x * x % 7) for x in range(30)], seed=3)


# ------------------------------------------------------------------ suites

def test_builtin_suites_load():
    for name in suites.BUILTIN:
        items = suites.load(name)
        assert items and all("prompt" in it for it in items)
    arith = suites.load("arithmetic")
    assert {it["split"] for it in arith} == {"easy", "hard"}
    assert {it["lang"] for it in suites.load("language")} == {"en", "de"}
    assert suites.resolve("all") == list(suites.BUILTIN)
    sample = suites.sample(arith, 30)
    assert len(sample) == 30 and {it["split"] for it in sample} == {"easy", "hard"}


def test_sample_takes_every_split_in_proportion_with_a_floor():
    from collections import Counter

    full = suites.load("sensitive")  # a skewed suite from it: 14 sensitive, 62 benign
    sens = [it for it in full if it["split"] == "sensitive"][:14] + [it for it in full if it["split"] == "benign"][:62]
    got = Counter(it["split"] for it in suites.sample(sens, 20))
    assert got == {"sensitive": 5, "benign": 15}  # proportional would give 3.7 sensitive: the floor is 5
    assert Counter(it["split"] for it in suites.sample(sens, 60)) == {"sensitive": 11, "benign": 49}
    assert Counter(it["split"] for it in suites.sample(sens, 6)) == {"sensitive": 3, "benign": 3}
    items = [{"prompt": str(i), "split": "a" if i < 3 else "b"} for i in range(50)]  # split a has only 3
    got = suites.sample(items, 10)
    assert Counter(it["split"] for it in got) == {"a": 3, "b": 7} and len({it["prompt"] for it in got}) == 10
    assert [it["prompt"] for it in got] == sorted((it["prompt"] for it in got), key=int)  # file order kept
    assert suites.allocate(3, {"x": 100, "y": 100, "z": 100}) == {"x": 1, "y": 1, "z": 1}


def test_suite_errors(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok", "answer": "1"}\n{"prompt": "broken"\n')
    with pytest.raises(ChimeraError, match=r"bad.jsonl:2: malformed JSON"):
        suites.load(str(bad))
    noprompt = tmp_path / "noprompt.jsonl"
    noprompt.write_text('{"answer": "1"}\n')
    with pytest.raises(ChimeraError, match=r"noprompt.jsonl:1: missing 'prompt'"):
        suites.load(str(noprompt))
    with pytest.raises(ChimeraError, match="unknown suite"):
        suites.load("nonsense")
    with pytest.raises(ChimeraError, match="not found"):
        suites.load(str(tmp_path / "missing.jsonl"))
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(ChimeraError, match="no items"):
        suites.load(str(tmp_path / "empty.jsonl"))


def _cli(monkeypatch, capsys, *args):
    from chimera import cli

    monkeypatch.setattr(sys, "argv", ["chimera", *args])
    with pytest.raises(SystemExit) as e:
        cli.main()
    out = capsys.readouterr()
    return e.value.code, out.out, out.err


def test_cli_one_line_errors(monkeypatch, capsys, tmp_path):
    code, _, err = _cli(monkeypatch, capsys, "eval", str(tmp_path / "nope"))
    assert code == 2 and err.strip().count("\n") == 0 and "nope: model directory not found" in err
    code, _, err = _cli(monkeypatch, capsys, "eval", "tiny-r1", "--suite", "nonsense")
    assert code == 2 and err.startswith("error: unknown suite")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "x"}\nnot json\n')
    code, _, err = _cli(monkeypatch, capsys, "eval", "tiny-r1", "--suite", str(bad))
    assert code == 2 and "bad.jsonl:2: malformed JSON" in err and err.strip().count("\n") == 0


def test_cli_eval_and_generate(monkeypatch, capsys, tmp_path):
    own = tmp_path / "own.jsonl"
    own.write_text(json.dumps({"prompt": "What is 12 + 30 ?", "answer": "42", "split": "mine"}) + "\n")
    out_json = tmp_path / "r.json"
    from chimera import cli

    monkeypatch.setattr(sys, "argv", ["chimera", "eval", "tiny-r1", "--suite", str(own), "--json", str(out_json)])
    cli.main()
    report = json.loads(out_json.read_text())["suites"]["own"]
    assert report["n"] == 1 and report["metrics"]["accuracy"]["value"] == 1.0
    assert report["metrics"]["think_rate"]["value"] == 1.0 and "mine" in report["splits"]
    monkeypatch.setattr(sys, "argv", ["chimera", "generate", "tiny-v3", "What is 2 + 3 ?"])
    cli.main()
    assert "5" in capsys.readouterr().out


# ------------------------------------------------------------------ endpoint

@pytest.fixture(scope="module")
def tiny_r1():
    from chimera.eval import harness

    return harness.load("tiny-r1")


@pytest.fixture(scope="module")
def server(tiny_r1):
    """A local OpenAI-compatible server answering with the real tiny-r1 (greedy)."""
    from chimera.eval import harness

    model, tok = tiny_r1
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *a):
            pass

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            with lock:
                if self.path == "/v1/chat/completions":
                    prompt = body["messages"][-1]["content"]
                    texts, counts = harness.generate_counted(model, tok, [prompt], body.get("max_tokens", 64))
                    choice = {"index": 0, "message": {"role": "assistant", "content": texts[0]}}
                elif self.path == "/v1/completions":
                    texts, counts = harness.generate_counted(model, tok, [body["prompt"]], body.get("max_tokens", 64),
                                                              chat=False)
                    choice = {"index": 0, "text": texts[0]}
                elif self.path == "/split/v1/chat/completions":  # vLLM's reasoning parser splits the think block
                    texts, counts = ["The answer is 5 ."], [6]
                    choice = {"index": 0, "message": {"content": texts[0], "reasoning_content": "two plus three"}}
                else:
                    self.send_error(404, "no such route")
                    return
            data = json.dumps({"choices": [choice], "usage": {"completion_tokens": counts[0]}}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


def test_endpoint_scores_like_local(server, tiny_r1):
    from chimera.eval import harness

    model, tok = tiny_r1
    local = harness.evaluate(model, tok, "arithmetic", n=6, keep_responses=True, max_new_tokens=64)
    remote = harness.evaluate(Endpoint(server + "/v1/chat/completions", model="tiny-r1"), None, "arithmetic", n=6,
                              keep_responses=True, max_new_tokens=64)
    assert [r["response"] for r in remote["arithmetic"]["responses"]] == \
           [r["response"] for r in local["arithmetic"]["responses"]]
    for k in ("accuracy", "think_rate", "output_tokens_mean"):
        assert remote["arithmetic"]["metrics"][k]["value"] == local["arithmetic"]["metrics"][k]["value"]
    assert remote["arithmetic"]["metrics"]["think_rate"]["value"] == 1.0


def test_endpoint_completions_and_reasoning_field(server):
    ep = Endpoint(server + "/v1/completions")
    assert not ep.chat
    text, n = ep.complete("<bos><|user|> What is 2 + 3 ?<|assistant|>", 64)
    assert scorers.think(text) and scorers.accuracy(text, {"answer": "5"}) and n > 5
    text, _ = Endpoint(server + "/split/v1/chat/completions").complete("x")
    assert text == "<think>two plus three</think>The answer is 5 ."
    with pytest.raises(ChimeraError, match="HTTP 404"):
        Endpoint(server + "/nowhere/v1/completions").complete("x")
    with pytest.raises(ChimeraError, match="expected an http"):
        Endpoint("ftp://x")
    assert Endpoint("http://h:1").url == "http://h:1/v1/chat/completions"
    assert Endpoint("http://h:1/v1").url == "http://h:1/v1/chat/completions"


def test_cli_endpoint(server, monkeypatch, capsys, tmp_path):
    out_json = tmp_path / "e.json"
    from chimera import cli

    monkeypatch.setattr(sys, "argv", ["chimera", "eval", "tiny-r1", "--endpoint", server + "/v1/chat/completions",
                                      "--suite", "sensitive", "--n", "6", "--json", str(out_json)])
    cli.main()
    rep = json.loads(out_json.read_text())["suites"]["sensitive"]
    assert rep["n"] == 6 and rep["metrics"]["think_rate"]["value"] == 1.0
    code, _, err = _cli(monkeypatch, capsys, "eval", "m", "--endpoint", "http://127.0.0.1:9/v1/completions",
                        "--suite", "sensitive", "--n", "1")
    assert code == 2 and err.startswith("error: endpoint http://127.0.0.1:9/v1/completions")


# ------------------------------------------------------------------ any causal LM

def test_harness_on_a_non_deepseek_model_without_chat_template(tmp_path):
    """A plain HF causal LM (GPT-2 layout, no chat template) goes through the same path."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from chimera.eval import harness
    from chimera.zoo import family

    tok = harness.load("tiny-v3")[1]
    tok.chat_template = None
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=1, n_head=2, n_positions=256,
                                       eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id))
    model.save_pretrained(tmp_path / "gpt2")
    tok.save_pretrained(tmp_path / "gpt2")
    m, t = harness.load(tmp_path / "gpt2")
    rep = harness.evaluate(m, t, "arithmetic", n=4, max_new_tokens=5)
    assert rep["arithmetic"]["n"] == 4 and rep["arithmetic"]["metrics"]["output_tokens_mean"]["value"] <= 5
    assert family.model_path("tiny-v3").is_dir()


def test_generate_with_experts_switched_off(monkeypatch, capsys):
    from chimera import cli

    monkeypatch.setattr(sys, "argv", ["chimera", "generate", "tiny-r1", "What is 2 + 3 ?", "--off", "1:0,2:5",
                                      "--mode", "drop", "--max-new-tokens", "40"])
    cli.main()
    assert capsys.readouterr().out.strip()
    code, _, err = _cli(monkeypatch, capsys, "generate", "tiny-r1", "x", "--off", "1:0", "--mode", "sideways")
    assert code == 2 and "--mode must be replace | drop" in err
