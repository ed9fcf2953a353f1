"""The README's examples, run as a user runs them, so an edit that breaks one fails here.

Every fenced `bash` and `python` block of README.md runs in order in one scratch folder that sees the
repository's `chimera/` (bundled suites) like the repository root does; the `yaml` block is the
`recipe.yaml` the text tells the user to save. What cannot run here as written is replaced or skipped
by the tables below, each with its reason; the test checks the tables against the README, so a stale
entry fails too.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from markdown_it import MarkdownIt

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"

# README text -> (what runs instead, why)
SUBSTITUTE = {
    "/ckpt/DeepSeek-V3-0324": ("tiny-v3-fp8", "no DeepSeek checkpoint here: the bundled FP8 models, as the text says"),
    "/ckpt/DeepSeek-R1": ("tiny-r1-fp8", "no DeepSeek checkpoint here: the bundled FP8 models, as the text says"),
    "python3 tasks.py demo": ("chimera demo -o demo-out --n 8",
                              "tasks.py first makes .venv (torch and all); the demo itself runs, 8 prompts per model"),
    "--vary routed_experts.r1=0:1:0.1 --suite all": (
        "--vary routed_experts.r1=0,1 --suite arithmetic --n 4 --max-new-tokens 48",
        "11 children x 3 full suites take about an hour here: 2 children on 4 arithmetic prompts"),
}
# README lines not run, and why
SKIP = {
    "python3 tasks.py test": "the test suite itself, which this test is part of",
}


def blocks() -> list[tuple[str, str]]:
    return [(t.info.strip(), t.content) for t in MarkdownIt().parse(README.read_text()) if t.type == "fence"]


def prepare(text: str) -> str:
    for old, (new, _) in SUBSTITUTE.items():
        text = text.replace(old, new)
    return "\n".join("# skipped: " + line if line.split("#")[0].strip() in SKIP else line
                     for line in text.splitlines()) + "\n"


def test_the_tables_match_the_readme():
    text = README.read_text()
    for old in SUBSTITUTE:
        assert old in text, f"stale substitution: {old!r} is no longer in README.md"
    lines = {line.split("#")[0].strip() for _, body in blocks() for line in body.splitlines()}
    assert set(SKIP) <= lines, set(SKIP) - lines
    assert sorted(SKIP.values()) == ["the test suite itself, which this test is part of"]
    assert {kind for kind, _ in blocks()} == {"bash", "yaml", "python"}


def test_readme_examples_run(tmp_path):
    (tmp_path / "chimera").symlink_to(ROOT / "chimera")  # chimera/eval/suites/... as from the repository root
    yaml_blocks = [body for kind, body in blocks() if kind == "yaml"]
    assert len(yaml_blocks) == 1
    (tmp_path / "recipe.yaml").write_text(prepare(yaml_blocks[0]))
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}", "COLUMNS": "80"}
    env.pop("CHIMERA_DEBUG", None)
    outputs = []
    for i, (kind, body) in enumerate(blocks()):
        if kind not in ("bash", "python"):
            continue
        script = prepare(body)
        cmd = ["bash", "-e", "-o", "pipefail", "-c", script] if kind == "bash" else [sys.executable, "-c", script]
        p = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1200)
        assert p.returncode == 0 and "Traceback" not in p.stderr, f"README block {i}:\n{script}\n{p.stderr[-3000:]}"
        outputs.append((script, p.stdout))
    # what the examples promised exists
    for f in ("r1t/model.safetensors", "r1t-bf16/chimera_merge.json", "diff.csv", "diff.png", "routes.npz",
              "ftri.json", "ftri.png", "ftri-de.json", "tiny-r1-off/chimera-tune.json", "r1t-from-python/config.json",
              "sweep/table.csv", "sweep/report/index.html", "demo-out/tiny-r1t/config.json"):
        assert (tmp_path / f).exists(), f
    # the README's printed result: every tensor of the bundled bf16 parents copied (R1T of tiny-v3 and tiny-r1)
    from bundled import tensor_count

    n = tensor_count()
    assert f"{{'copy': {n}}}" in "".join(out for _, out in outputs)
    assert f"# {{'copy': {n}}}" in README.read_text()
    # the demo reports refusal once (step 3, on the whole sensitive suite), not also in step 2
    demo = next(out for script, out in outputs if "chimera demo" in script)
    before, _, after = demo.partition("3. Mixture of Tunable Experts")
    assert "refusal" not in before.lower() and "refusal: sensitive" in after
