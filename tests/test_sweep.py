"""Behaviour sweeps: grid parsing and its one-line errors, a real 3-point sweep on the bundled models
(table columns, parents' rows == the parents' own evaluation, resume, worker processes), the endpoint
path against a local server started per child, and the report's files."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from chimera.errors import ChimeraError
from chimera.merge.recipe import from_dict
from chimera.sweep import build_grid, parse_values, parse_vary

N, MAX_NEW, SUITES = 6, 48, "arithmetic,sensitive"
REPO = Path(__file__).resolve().parents[1]


def _recipe3():
    return from_dict({"parents": {"v3": "/x/v3", "r1": "/x/r1", "r1long": "/x/r1long"}, "base": "v3",
                      "weights": {"default": {"v3": 1.0}, "routed_experts": {"v3": 0.5, "r1": 0.25, "r1long": 0.25}}})


# ------------------------------------------------------------------ grid spec (no models)

def test_values_inclusive_and_rounding_safe():
    assert parse_values("0:1:0.1", "x") == [round(i / 10, 10) for i in range(11)]
    assert 0.3 in parse_values("0:1:0.1", "x")
    assert parse_values("0:1:0.3", "x") == [0.0, 0.3, 0.6, 0.9, 1.0]
    assert parse_values("1,0.5,0,0.5", "x") == [0.0, 0.5, 1.0]


@pytest.mark.parametrize("spec, msg", [
    ("routed_expert.r1=0:1:0.5", "unknown tensor class 'routed_expert'"),
    ("routed_experts.r2=0,1", "unknown parent 'r2'"),
    ("routed_experts.r1=0:1.5:0.5", "lambda 1.5 is outside [0, 1]"),
    ("routed_experts.r1=-0.1,0.5", "lambda -0.1 is outside [0, 1]"),
    ("routed_experts.r1=0:1:0", "step must be > 0"),
    ("routed_experts.r1=a,b", "values must be numbers"),
    ("routed_experts.r1", "expected CLASS.PARENT=VALUES"),
    ("threshold.delta=-1", "threshold.delta must be >= 0"),
    ("threshold.metric=1", "only threshold.delta"),
])
def test_bad_vary_is_one_line_error(spec, msg):
    with pytest.raises(ChimeraError) as e:
        parse_vary(spec, _recipe3())
    assert msg in str(e.value) and "\n" not in str(e.value)


def test_two_parent_and_three_parent_rules():
    two = from_dict({"parents": {"v3": "/x/v3", "r1": "/x/r1"}, "base": "v3", "weights": {"default": {"v3": 1.0}}})
    pts, skipped = build_grid(two, [parse_vary("routed_experts.r1=0:1:0.25", two)])
    assert skipped == 0 and [p.recipe["weights"]["routed_experts"] for p in pts][1] == {"v3": 0.75, "r1": 0.25}
    assert pts[0].recipe["weights"]["routed_experts"] == {"v3": 1.0}
    assert all(p.recipe["weights"]["default"] == {"v3": 1.0} for p in pts)
    # three parents: the rest is split in proportion to the recipe's other lambdas of that class
    r3 = _recipe3()
    pts, _ = build_grid(r3, [parse_vary("routed_experts.r1=0.5", r3)])
    assert pts[0].recipe["weights"]["routed_experts"] == pytest.approx({"v3": 0.5 * 0.5 / 0.75, "r1": 0.5, "r1long": 0.5 * 0.25 / 0.75})
    # two axes on one class: a simplex; points summing above 1 are skipped
    pts, skipped = build_grid(r3, [parse_vary("routed_experts.r1=0:1:0.5", r3), parse_vary("routed_experts.r1long=0:1:0.5", r3)])
    assert len(pts) == 6 and skipped == 3
    # the rest can't be split when the other parents all have lambda 0 in the base vector
    pts, _ = build_grid(r3, [parse_vary("default.r1=0.5", r3)])
    assert pts[0].recipe["weights"]["default"] == {"v3": 0.5, "r1": 0.5}
    only_r1 = from_dict({"parents": {"v3": "/x/v3", "r1": "/x/r1", "r1long": "/x/r1long"}, "base": "v3",
                         "weights": {"default": {"r1": 1.0}}})
    with pytest.raises(ChimeraError, match="cannot split the remaining 0.5 among v3, r1long"):
        build_grid(only_r1, [parse_vary("default.r1=0.5", only_r1)])
    with pytest.raises(ChimeraError, match="given twice"):
        build_grid(r3, [parse_vary("default.r1=0.5", r3), parse_vary("default.r1=1", r3)])
    pts, _ = build_grid(r3, [parse_vary("threshold.delta=0,0.1", r3)])
    assert [p.recipe["threshold"]["delta"] for p in pts] == [0.0, 0.1]


def test_cli_error_is_one_line(tmp_path):
    rec = tmp_path / "r.yaml"
    rec.write_text("parents: {v3: /x/v3, r1: /x/r1}\nbase: v3\nweights: {default: {v3: 1.0}}\n")
    p = subprocess.run([sys.executable, "-m", "chimera", "sweep", str(rec), "--vary", "bogus.r1=0,1", "-o",
                        str(tmp_path / "o")], capture_output=True, text=True, cwd=REPO)
    assert p.returncode == 2
    from chimera.checkpoint.arch import CLASSES

    assert p.stderr.strip().splitlines() == ["error: --vary bogus.r1=0,1: unknown tensor class 'bogus' "
                                             f"(classes: default, {', '.join(CLASSES)})"]


# ------------------------------------------------------------------ a real sweep on the bundled models

@pytest.fixture(scope="module")
def zoo_recipe(tmp_path_factory):
    from chimera.zoo import family

    assert {"tiny-v3", "tiny-r1"} <= set(family.available()), "bundled tiny-v3 / tiny-r1 missing"
    d = tmp_path_factory.mktemp("sweep")
    rec = d / "recipe.yaml"
    rec.write_text(f"parents: {{v3: {family.model_path('tiny-v3')}, r1: {family.model_path('tiny-r1')}}}\n"
                   "base: v3\nweights: {default: {v3: 1.0}}\n")
    return rec


@pytest.fixture(scope="module")
def swept(zoo_recipe):
    from chimera.sweep import run_sweep

    out = zoo_recipe.parent / "out"
    res = run_sweep(zoo_recipe, ["default.r1=0:1:0.5"], out, SUITES, N, max_new_tokens=MAX_NEW, progress=False)
    return res


def _metrics(row: dict) -> dict:
    return {k: v for k, v in row.items() if k.split("_")[0] in ("accuracy", "think", "output", "refusal")
            or k.startswith(("arithmetic.", "sensitive."))}


def test_sweep_table(swept):
    rows = swept.rows
    assert [r["point"] for r in rows] == ["parent-v3", "parent-r1", "default.r1-0", "default.r1-0.5", "default.r1-1"]
    assert len(swept.computed) == 5 and not swept.reused
    cols = set(rows[0])
    for c in ("point", "kind", "label", "default.r1", "weights", "accuracy", "accuracy_lo", "accuracy_hi",
              "think_rate", "think_rate_lo", "think_rate_hi", "output_tokens_mean", "output_tokens_p90",
              "refusal_rate", "reasoning_language", "output_tokens_mean_lo", "output_tokens_mean_hi"):
        assert c in cols, c
    csv_head = (swept.out / "table.csv").read_text().splitlines()[0].split(",")
    assert csv_head[:3] == ["point", "kind", "label"] and "think_rate_hi" in csv_head
    assert json.loads((swept.out / "table.json").read_text()) == json.loads(json.dumps(rows))
    assert rows[3]["weights"] == "default: v3=0.5 r1=0.5"
    assert rows[3]["accuracy_n"] == N and rows[3]["refusal_rate_n"] >= 1
    # the lambda=0 / lambda=1 whole-model children are bit-identical copies of the parents
    assert _metrics(rows[2]) == _metrics(rows[0])
    assert _metrics(rows[4]) == _metrics(rows[1])
    assert not any((swept.out / "children").iterdir())  # children removed after evaluation


def test_parent_rows_match_own_evaluation(swept):
    from chimera.eval import harness
    from chimera.sweep import row
    from chimera.zoo import family

    model, tok = harness.load(family.model_path("tiny-r1"))
    own = harness.evaluate(model, tok, SUITES, n=N, max_new_tokens=MAX_NEW)
    rec = json.loads((swept.out / "points" / "parent-r1.json").read_text())
    for suite in own:
        assert rec["report"][suite]["metrics"] == json.loads(json.dumps(own[suite]["metrics"]))
    mine = row({"id": "x", "kind": "parent", "label": "r1", "coords": {}, "report": own}, ["default.r1"])
    parent_row = next(r for r in swept.rows if r["label"] == "r1")
    assert _metrics(mine) == _metrics(parent_row)


def test_resume_skips_finished_points_and_workers(swept, zoo_recipe, tmp_path):
    from chimera.sweep import run_sweep

    again = run_sweep(zoo_recipe, ["default.r1=0:1:0.5"], swept.out, SUITES, N, max_new_tokens=MAX_NEW, progress=False)
    assert again.computed == [] and len(again.reused) == 5
    assert again.rows == swept.rows
    # an interrupted sweep: two points lost -> only they are recomputed, here in 2 worker processes
    for pid in ("default.r1-0.5", "parent-v3"):
        (swept.out / "points" / f"{pid}.json").unlink()
    (swept.out / "points" / "default.r1-1.json.partial").write_text("{")  # a write cut short
    third = run_sweep(zoo_recipe, ["default.r1=0:1:0.5"], swept.out, SUITES, N, max_new_tokens=MAX_NEW,
                      workers=2, progress=False)
    assert sorted(third.computed) == ["default.r1-0.5", "parent-v3"] and len(third.reused) == 3
    for a, b in zip(third.rows, swept.rows):
        assert a["point"] == b["point"] and a["accuracy"] == b["accuracy"] and a["think_rate"] == b["think_rate"]
    # changed settings (n) are not silently reused
    shutil.copytree(swept.out, tmp_path / "copy")
    changed = run_sweep(zoo_recipe, ["default.r1=1"], tmp_path / "copy", "arithmetic", 2, max_new_tokens=8,
                        parents=False, progress=False)
    assert changed.computed == ["default.r1-1"]


def test_report_files(swept):
    from chimera.report import write_report

    page = write_report(swept.out)
    out = page.parent
    md = (out / "README.md").read_text()
    assert "| **v3** |" in md and "default.r1" in md
    assert (out / "tradeoff.png").stat().st_size > 1000
    assert (out / "metrics_vs_default.r1.png").stat().st_size > 1000
    html = page.read_text()
    assert html.count("data:image/png;base64,") >= 2 and 'src="tradeoff.png"' not in html


SERVER = textwrap.dedent('''
    import json, sys, threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
    from chimera.eval import harness
    model_dir, port = sys.argv[1], int(sys.argv[2])
    model, tok = harness.load(model_dir)
    lock = threading.Lock()
    class H(BaseHTTPRequestHandler):
        def log_message(self, *a):
            pass
        def _send(self, code, obj):
            b = json.dumps(obj).encode()
            self.send_response(code); self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(b))); self.end_headers(); self.wfile.write(b)
        def do_GET(self):
            self._send(200, {"data": [{"id": model_dir}]})
        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            assert body["model"] == model_dir, body["model"]
            with lock:
                texts, counts = harness.generate_counted(model, tok, [body["messages"][0]["content"]],
                                                         max_new_tokens=body["max_tokens"])
            self._send(200, {"choices": [{"message": {"content": texts[0]}}],
                             "usage": {"completion_tokens": counts[0]}})
    ThreadingHTTPServer(("127.0.0.1", port), H).serve_forever()
''')


def test_endpoint_mode_one_server_per_child(zoo_recipe, tmp_path):
    from chimera.sweep import EndpointSpec, run_sweep

    script = tmp_path / "server.py"
    script.write_text(SERVER)
    ep = EndpointSpec(f"{sys.executable} {script} {{model}} {{port}}", startup_timeout=120)
    res = run_sweep(zoo_recipe, ["routed_experts.r1=1"], tmp_path / "ep", "arithmetic", 3, max_new_tokens=24,
                    parents=False, endpoint=ep, progress=False)
    (r,) = res.rows
    assert r["point"] == "routed_experts.r1-1" and r["accuracy_n"] == 3 and r["output_tokens_mean"] > 0
    rec = json.loads((tmp_path / "ep" / "points" / "routed_experts.r1-1.json").read_text())
    assert rec["endpoint"] is True
    # a server that dies at start is a one-line error naming it
    bad = EndpointSpec(f"{sys.executable} -c 'import sys; sys.exit(3)' {{model}} {{port}}", startup_timeout=30)
    with pytest.raises(ChimeraError, match="exited with status 3"):
        run_sweep(zoo_recipe, ["routed_experts.r1=0"], tmp_path / "bad", "arithmetic", 2, max_new_tokens=8,
                  parents=False, endpoint=bad, progress=False)
