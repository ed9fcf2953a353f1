"""Plan time on a many-shard parent, and merge time with and without per-tensor distances.

    python benchmarks/bench_robust.py                    # this tree
    python benchmarks/bench_robust.py --src /tmp/old     # another chimera source tree (e.g. `git archive main`)

Parents (generated once under benchmarks/_data/):
  many-a, many-b   DeepSeek-V3 layout at full name count (61 layers, 256 routed experts, MTP layer),
                   163 shards, tiny tensors: 95k header entries per parent, so plan time is header time
  mid-a, mid-b     make_parents.deepseek(layers=4, experts=16): ~0.6 GB of FP8 each
Each number is the best of --repeat fresh processes (imports included). Results are appended to
benchmarks/results/robust.json under the source tree's label.
"""
from __future__ import annotations

import argparse
import json
import platform
import shutil
import site
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent
DATA = ROOT / "_data"
RESULTS = ROOT / "results" / "robust.json"


def many_shard_parent(path: Path, layers: int = 61, experts: int = 256, shards: int = 163) -> None:
    """Real safetensors files (zero data) with DeepSeek-V3's full tensor-name count."""
    if (path / "config.json").exists():
        return
    path.mkdir(parents=True, exist_ok=True)
    cfg = {"model_type": "deepseek_v3", "num_hidden_layers": layers, "first_k_dense_replace": 3,
           "n_routed_experts": experts, "num_experts_per_tok": 8, "n_group": 8, "topk_group": 4,
           "hidden_size": 1, "vocab_size": 1, "quantization_config": {"quant_method": "fp8", "fmt": "e4m3",
           "activation_scheme": "dynamic", "weight_block_size": [128, 128]}}
    (path / "config.json").write_text(json.dumps(cfg))
    names: list[tuple[str, str, list[int]]] = [("model.embed_tokens.weight", "BF16", [1, 1]),
                                               ("lm_head.weight", "BF16", [1, 1]), ("model.norm.weight", "BF16", [1])]

    def fp8(n: str) -> None:
        names.append((n, "F8_E4M3", [1, 1]))
        names.append((n[: -len(".weight")] + ".weight_scale_inv", "F32", [1, 1]))

    for L in range(layers + 1):
        p = f"model.layers.{L}."
        names += [(p + "input_layernorm.weight", "BF16", [1]), (p + "post_attention_layernorm.weight", "BF16", [1])]
        for a in ("q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"):
            fp8(p + f"self_attn.{a}.weight")
        if L < 3:
            for m in ("gate_proj", "up_proj", "down_proj"):
                fp8(p + f"mlp.{m}.weight")
            continue
        names += [(p + "mlp.gate.weight", "BF16", [experts, 1]), (p + "mlp.gate.e_score_correction_bias", "F32", [experts])]
        for m in ("gate_proj", "up_proj", "down_proj"):
            fp8(p + f"mlp.shared_experts.{m}.weight")
            for e in range(experts):
                fp8(p + f"mlp.experts.{e}.{m}.weight")
        if L == layers:
            for n in ("enorm", "hnorm", "shared_head.norm"):
                names.append((p + f"{n}.weight", "BF16", [1]))
            names.append((p + "eh_proj.weight", "BF16", [1, 2]))
    size = {"BF16": 2, "F32": 4, "F8_E4M3": 1}
    wm, per = {}, -(-len(names) // shards)
    for i in range(shards):
        fn = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        header, pos = {"__metadata__": {"format": "pt"}}, 0
        for n, dt, shape in names[i * per:(i + 1) * per]:
            nb = size[dt]
            for d in shape:
                nb *= d
            header[n] = {"dtype": dt, "shape": shape, "data_offsets": [pos, pos + nb]}
            pos += nb
            wm[n] = fn
        raw = json.dumps(header).encode()
        raw += b" " * (-len(raw) % 8)
        (path / fn).write_bytes(len(raw).to_bytes(8, "little") + raw + bytes(pos))
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wm}))


def python(src: Path | None) -> list[str]:
    """A python that imports chimera from `src` (site-packages added by hand, no editable finder)."""
    if src is None:
        return [sys.executable]
    paths = [str(src)] + site.getsitepackages()
    return [sys.executable, "-S", "-c", f"import sys, runpy; sys.path[:0] = {paths!r}; "
            "sys.argv = sys.argv[1:] or ['-']; runpy.run_path(sys.argv[0], run_name='__main__')"]


def timed(cmd: list[str], repeat: int, before=None) -> float:
    best = float("inf")
    for _ in range(repeat):
        if before:
            before()
        t = time.perf_counter()
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        best = min(best, time.perf_counter() - t)
    return round(best, 2)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--src", type=Path, default=None)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--label", default=None, help="name of this run in the results file")
    args = ap.parse_args()
    label = args.label or (str(args.src) if args.src else "this tree")
    many_shard_parent(DATA / "many-a")
    many_shard_parent(DATA / "many-b")
    if not (DATA / "mid-a" / "config.json").exists():
        sys.path.insert(0, str(ROOT))
        from make_parents import deepseek

        deepseek(DATA / "mid-a", 1, layers=4, experts=16)
        deepseek(DATA / "mid-b", 2, layers=4, experts=16)
    tmp = DATA / "robust"
    tmp.mkdir(exist_ok=True)
    py = python(args.src)
    script = tmp / "run.py"
    script.write_text(
        "import sys, time\nt = time.perf_counter()\nfrom chimera.merge.plan import build_plan\n"
        "from chimera.merge.recipe import load\nfrom chimera.merge.execute import run_merge\n"
        "plan = build_plan(load(sys.argv[1]))\nprint('plan_s', time.perf_counter() - t, file=sys.stderr)\n"
        "if len(sys.argv) > 2:\n    kw = {'distances': False} if sys.argv[3:] == ['nodist'] else {}\n"
        "    run_merge(plan, sys.argv[2], **kw)\n")
    rows = []

    def recipe(name: str, a: Path, b: Path, weights: dict) -> Path:
        p = tmp / f"{name}.yaml"
        p.write_text(yaml.safe_dump({"parents": {"a": str(a), "b": str(b)}, "base": "a", "weights": weights,
                                     "output": {"shard_size": "1GB"}}))
        return p

    r1t = {"default": {"a": 1.0}, "routed_experts": {"b": 1.0}}
    many = recipe("many", DATA / "many-a", DATA / "many-b", r1t)
    n_files = len(list((DATA / "many-a").glob("*.safetensors")))
    rows.append({"case": f"plan, R1T recipe, 2 parents x {n_files} shards x 95k header entries (process incl. imports)",
                 "s": timed([*py, str(script), str(many)], args.repeat)})
    out = tmp / "child"
    clean = lambda: shutil.rmtree(out, ignore_errors=True)  # noqa: E731
    cases = [("merge R1T selection, 2 x 0.6 GB FP8", r1t, []),
             ("merge fractional 0.5/0.5 FP8 (eager)", {"default": {"a": 0.5, "b": 0.5}}, [])]
    if args.src is None:
        cases.insert(1, ("merge R1T selection, distances=False", r1t, ["nodist"]))
    for name, w, extra in cases:
        r = recipe("mid", DATA / "mid-a", DATA / "mid-b", w)
        rows.append({"case": name, "s": timed([*py, str(script), str(r), str(out), *extra], args.repeat, clean)})
        print(json.dumps(rows[-1]), flush=True)
    clean()
    sys.path.insert(0, str(ROOT))
    from bench_merge import floor

    rows.append({"case": "floor: cat both mid parents + copy one", "s": round(min(
        floor(DATA / "mid-a", DATA / "mid-b", tmp) for _ in range(args.repeat)), 2)})
    res = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    res["machine"] = {"cpus": __import__("os").cpu_count(), "python": platform.python_version()}
    res[label] = rows
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(res, indent=2) + "\n")
    print(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
