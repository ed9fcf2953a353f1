"""A newcomer's first hour, through the real command line (a subprocess each): usage mistakes are one
line and status 2, cheap mistakes fail before any model loads, bundled names work everywhere, progress
stays off piped output, tables fit 80 columns, numbers don't mislead."""
from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from chimera.zoo import family

from bundled import N_EXPERTS, N_LAYERS, tensor_count

LAST_LAYER, LAST_EXPERT = N_LAYERS - 1, N_EXPERTS - 1

ENV = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "FORCE_COLOR", "TTY_COMPATIBLE", "CHIMERA_DEBUG")}


def chimera(*args, cwd=None, env=None, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "chimera", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, env={**ENV, **(env or {})}, timeout=timeout)


def one_line_error(p: subprocess.CompletedProcess, *needles: str, code: int = 2, quiet: bool = True) -> str:
    err = p.stderr.strip()
    assert p.returncode == code, (p.returncode, p.stderr, p.stdout)
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    assert p.stdout == "" or not quiet, p.stdout
    for n in needles:
        assert n in err, (n, err)
    return err


@pytest.fixture(scope="module")
def broken(tmp_path_factory) -> Path:
    """tiny-r1's config and tokenizer with weights no one can load: any command that got as far as loading
    the model would fail on them, so an argument error proves the arguments were checked first."""
    d = tmp_path_factory.mktemp("broken") / "broken-model"
    d.mkdir()
    src = family.model_path("tiny-r1")
    for f in src.iterdir():
        if not f.name.endswith(".safetensors"):
            shutil.copy(f, d / f.name)
    (d / "model.safetensors").write_bytes(b"\xff" * 8 + b"not a safetensors header")
    return d


@pytest.fixture(scope="module")
def prompts(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("prompts") / "p.jsonl"
    p.write_text("\n".join(json.dumps({"prompt": f"What is {i} + {i + 1} ?"}) for i in range(3)) + "\n")
    return p


# ------------------------------------------------------------------ 1. usage errors

def test_usage_mistakes_are_one_line_with_status_2():
    one_line_error(chimera("merge", "r1t.yaml"), "Missing option '-o'", "chimera merge --help")
    one_line_error(chimera("mrege", "r1t.yaml"), "No such command 'mrege'", "Did you mean 'merge'?")
    one_line_error(chimera("eval", "tiny-r1", "--n", "abc"), "'--n'", "integer")
    one_line_error(chimera("eval"), "Missing argument 'model'")
    one_line_error(chimera("eval", "tiny-r1", "--bogus"), "No such option", "--bogus")


def test_bare_chimera_prints_help_and_version_prints_the_version():
    p = chimera()
    assert p.returncode == 0 and p.stderr == "" and "Usage" in p.stdout and "merge" in p.stdout
    p = chimera("--version")
    assert p.returncode == 0 and p.stdout.strip() == f"chimera {importlib.metadata.version('chimera')}"


def test_an_os_error_is_one_line_and_chimera_debug_shows_the_traceback(tmp_path):
    recipe = tmp_path / "r1t.yaml"
    recipe.write_text(yaml.safe_dump({"parents": {"v3": "tiny-v3", "r1": "tiny-r1"}, "base": "v3"}))
    one_line_error(chimera("plan", recipe, "--json", "/dev/full"), "/dev/full", "No space left on device", quiet=False)
    # an OSError no command foresaw (a suite file that exists but cannot be read: EIO) is one line too
    one_line_error(chimera("eval", "tiny-r1", "--suite", "/proc/self/mem"), "Input/output error")
    p = chimera("eval", "tiny-r1", "--suite", "/proc/self/mem", env={"CHIMERA_DEBUG": "1"})
    assert p.returncode != 0 and "Traceback" in p.stderr and "OSError" in p.stderr


# ------------------------------------------------------------------ 6. cheap mistakes fail before the model loads

def test_the_broken_model_really_fails_to_load(broken):
    one_line_error(chimera("generate", broken, "hi"), str(broken / "model.safetensors"))


@pytest.mark.parametrize("args, needle", [
    (["eval", "{m}", "--off", "2-14"], "bad expert '2-14'"),
    (["eval", "{m}", "--off", "1:2", "--mode", "remove"], "--mode must be replace | drop"),
    (["generate", "{m}", "hi", "--off", "@missing.json:10"], "missing.json: fTRI result file not found"),
    (["eval", "{m}", "--off", "14:2"], f"--off 14:2: {{m}} has decoder layers 0-{LAST_LAYER}"),
    (["route", "{m}", "--prompts", "{prompts}", "--out", "r.npz", "--on", f"1:{LAST_EXPERT + 1}"],
     f"has routed experts 0-{LAST_EXPERT}"),
    (["eval", "{m}", "--suite", "arith"], "unknown suite 'arith'"),
    (["eval", "{m}", "--n", "0"], "--n must be at least 1"),
    (["eval", "{m}", "--json", "{tmp}"], "is a directory"),
    (["eval", "{m}", "--json", "{file}/report.json"], "is a file, not a folder"),
    (["route", "{m}", "--prompts", "{prompts}", "--out", "{tmp}"], "is a directory"),
    (["route", "{m}", "--prompts", "{tmp}/missing.jsonl", "--out", "r.npz"], "missing.jsonl: prompt file not found"),
    (["ftri", "{m}", "--target", "{prompts}", "--contrast", "{prompts}", "--label-by-response", "refusal",
      "--out", "f.json"], "--contrast is not used with --label-by-response"),
    (["ftri", "{m}", "--target", "{prompts}", "--label-by-response", "nonsense", "--out", "f.json"],
     "unknown scorer 'nonsense'"),
    (["ftri", "{m}", "--target", "{prompts}", "--contrast", "{prompts}", "--stat", "mean", "--out", "f.json"],
     "--stat must be count | weight"),
    (["tune", "{m}", "--off", "2-14", "-o", "{tmp}/tuned"], "bad expert '2-14'"),
    (["tune", "{m}", "--off", "1:2", "-o", "{file}"], "is a file, not a directory"),
    (["diff", "{m}", "tiny-v3", "--metric", "cosine"], "--metric must be relative | symmetric | rms"),
    (["convert", "{m}", "-o", "{tmp}/c", "--dtype", "fp4"], "--dtype must be bfloat16 | float32 | float8"),
    (["convert", "{m}", "-o", "{tmp}/c", "--shard-size", "lots"], "is not a size like 5GB"),
    (["merge", "{recipe}", "-o", "{tmp}/out", "--compile", "maybe"], "--compile must be auto | on | off"),
    (["merge", "{recipe}", "-o", "{file}"], "is a file, not a directory"),
    (["demo", "--n", "0"], "--n must be at least 1"),
])
def test_cheap_mistakes_fail_before_the_model_loads(args, needle, broken, prompts, tmp_path):
    file = tmp_path / "a-file"
    file.write_text("x")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"parents": {"a": str(broken), "b": "tiny-v3"}, "base": "a"}))
    fill = {"m": broken, "tmp": tmp_path, "file": file, "prompts": prompts, "recipe": recipe}
    err = one_line_error(chimera(*[a.format(**fill) for a in args], cwd=tmp_path), needle.format(**fill))
    assert "safetensors" not in err  # the weights were never opened
    assert not (tmp_path / "out").exists() and not (tmp_path / "c").exists() and not (tmp_path / "tuned").exists()


# ------------------------------------------------------------------ 7. bundled names work everywhere

def test_bundled_names_in_recipes_plan_diff_convert_tune(tmp_path):
    recipe = tmp_path / "r1t.yaml"
    recipe.write_text(yaml.safe_dump({"parents": {"v3": "tiny-v3-fp8", "r1": "tiny-r1-fp8"}, "base": "v3",
                                      "weights": {"default": {"v3": 1.0}, "routed_experts": {"r1": 1.0}}}))
    p = chimera("plan", recipe, "--json", tmp_path / "plan.json", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    assert "routed_experts" in p.stdout and "r1=1" in p.stdout
    p = chimera("diff", "tiny-r1", "tiny-v3", "--top", "3", "--csv", tmp_path / "d.csv")
    assert p.returncode == 0, p.stderr
    assert "routed_experts" in p.stdout and len((tmp_path / "d.csv").read_text().splitlines()) == 1 + tensor_count()
    p = chimera("convert", "tiny-r1", "-o", tmp_path / "r1-fp8", "--dtype", "float8")
    assert p.returncode == 0, p.stderr
    assert (tmp_path / "r1-fp8" / "model.safetensors").read_bytes() == \
        (family.model_path("tiny-r1-fp8") / "model.safetensors").read_bytes()
    p = chimera("tune", "tiny-r1", "--off", "1:2", "-o", tmp_path / "tuned")
    assert p.returncode == 0, p.stderr
    assert json.loads((tmp_path / "tuned" / "chimera-tune.json").read_text())["tensors"]
    one_line_error(chimera("eval", "tiny-r2"), "tiny-r2", "did you mean 'tiny-r1'?")


def test_a_local_directory_wins_over_a_bundled_name(tmp_path):
    from chimera.merge.recipe import load

    shutil.copytree(family.model_path("tiny-r1"), tmp_path / "tiny-v3")  # a folder that happens to be named tiny-v3
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"parents": {"v3": "tiny-v3", "r1": "tiny-r1"}, "base": "v3"}))
    r = load(recipe)
    assert r.parents["v3"] == (tmp_path / "tiny-v3").resolve()
    assert r.parents["r1"] == family.model_path("tiny-r1").resolve()


def test_one_resolver():
    from chimera.commands import moe
    from chimera.eval import harness

    assert not hasattr(harness, "resolve_model") or harness.resolve_model.__module__ == "chimera.resolve"
    assert not hasattr(moe, "resolve_model_path")


# ------------------------------------------------------------------ 3. progress off piped output; 80 columns

def test_progress_goes_to_a_terminal_stderr_only():
    args = ("generate", "tiny-r1", "What is 2 + 3 ?", "--max-new-tokens", "40")
    piped = chimera(*args)
    assert piped.returncode == 0 and piped.stderr == "", piped.stderr
    assert piped.stdout.strip().endswith("The answer is 5.")
    tty = chimera(*args, env={"TTY_COMPATIBLE": "1", "TTY_INTERACTIVE": "1"})
    assert tty.returncode == 0 and tty.stdout == piped.stdout
    assert "loading tiny-r1" in tty.stderr and "generate" in tty.stderr


def test_tables_fit_80_columns(tmp_path):
    p = chimera("eval", "tiny-v3", "--suite", "arithmetic", "--n", "6", "--max-new-tokens", "16",
                env={"COLUMNS": "80"})
    assert p.returncode == 0, p.stderr
    assert "accuracy" in p.stdout and "…" not in p.stdout
    assert max(len(line) for line in p.stdout.splitlines()) <= 80
    p = chimera("diff", "tiny-r1", "tiny-v3", "--top", "5", env={"COLUMNS": "80"})
    assert p.returncode == 0, p.stderr
    assert "model.layers." in p.stdout and "…" not in p.stdout
    assert max(len(line) for line in p.stdout.splitlines()) <= 80


# ------------------------------------------------------------------ 8. numbers that mislead

def test_eval_n_samples_every_split_and_prints_no_mixed_refusal_rate(tmp_path):
    from chimera.eval import suites

    full = suites.load("sensitive")  # a skewed copy of it, as users' suites are: 14 sensitive, 62 benign
    skewed = [it for it in full if it["split"] == "sensitive"][:14] + [it for it in full if it["split"] == "benign"][:62]
    (tmp_path / "sensitive.jsonl").write_text("".join(json.dumps(it) + "\n" for it in skewed))
    p = chimera("eval", "tiny-r1", "--suite", tmp_path / "sensitive.jsonl", "--n", "12", "--max-new-tokens", "24",
                "--json", tmp_path / "r.json")
    assert p.returncode == 0, p.stderr
    rows = [[c.strip() for c in line.split("│")[1:-1]] for line in p.stdout.splitlines() if line.count("│") >= 6]
    assert rows and not any(r[1] == "all" and r[2] == "refusal_rate" for r in rows)
    assert any(r[1] == "sensitive" and r[2] == "refusal_rate" and r[5] == "5" for r in rows)
    assert "sampled 12 of 76 items (benign 7 of 62, sensitive 5 of 14)" in p.stdout
    rep = json.loads((tmp_path / "r.json").read_text())["suites"]["sensitive"]
    assert "refusal_rate" not in rep["metrics"] and rep["sample"] == {"benign": {"n": 7, "of": 62},
                                                                        "sensitive": {"n": 5, "of": 14}}


def test_ftri_warns_when_a_class_is_small(prompts, tmp_path):
    p = chimera("ftri", "tiny-r1", "--target", prompts, "--contrast", prompts, "--top", "3",
                "--out", tmp_path / "f.json")
    assert p.returncode == 0, p.stderr
    assert "warning: fTRI: only 3 target prompt(s)" in p.stderr and "only 3 contrast prompt(s)" in p.stderr
    assert json.loads((tmp_path / "f.json").read_text())["n_target"] == 3


def test_chimera_merge_recipe_as_the_readme_writes_it(tmp_path):
    import chimera

    recipe = chimera.merge.Recipe.from_dict({"parents": {"v3": "tiny-v3", "r1": "tiny-r1"}, "base": "v3",
                                             "weights": {"default": {"v3": 1.0}, "routed_experts": {"r1": 1.0}}})
    res = chimera.merge(recipe, tmp_path / "r1t")
    assert res.ops == {"copy": tensor_count()}
    direct = chimera.merge.Recipe(parents={"v3": "tiny-v3", "r1": "tiny-r1"}, base="v3",
                                  weights={"default": {"v3": 1.0}, "routed_experts": {"r1": 1.0}})
    assert direct.parents == recipe.parents
