"""Merge speed and peak memory, side by side with mergekit and against the warm-cache disk floor.
Not a test: one JSON per run in benchmarks/results/ (merge-<UTC>.json, and merge.json = the latest).

    python3 benchmarks/make_parents.py benchmarks/_data   # once: ~7.5 GB of generated parents
    python3 benchmarks/mergekit_env.py                    # once: mergekit 0.1.5 in its own venv
    .venv/bin/python benchmarks/bench_merge.py [--repeat 3] [--only bf16]
    .venv/bin/python benchmarks/table.py --readme         # README's performance table from merge.json

Every figure is a median of --repeat runs, interleaved (floor, chimera, mergekit, floor, ...) so load
from other work on the machine spreads over all of them; each sample keeps the 1-minute load average
before and after it. Whole-process wall time (start-up included) of fresh processes; peak RSS is the
process's own high-water mark. The floor is what any merge must do with the parents in page cache:
`cat` both parents to /dev/null plus a copy of one parent, synced to disk (chimera fsyncs its output;
mergekit does not).
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, ROOT, run, summary, write_result  # noqa: E402

DATA = ROOT / "_data"
CHIMERA = [str(Path(sys.executable).parent / "chimera")]


@dataclass
class Case:
    name: str
    pair: str                       # "mx" (bf16 Mixtral) | "ds" (DeepSeek-V3 FP8)
    weights: dict
    flags: list[str] = field(default_factory=list)
    mergekit: bool = False
    goal_x_floor: float | None = None


CASES = [
    Case("bf16 linear 0.5/0.5 (Mixtral)", "mx", {"default": {"a": 0.5, "b": 0.5}}, mergekit=True),
    Case("fp8 selection (R1T recipe)", "ds", {"default": {"a": 1.0}, "routed_experts": {"b": 1.0}}, goal_x_floor=1.5),
    Case("fp8 selection (R1T recipe), --no-distances", "ds", {"default": {"a": 1.0}, "routed_experts": {"b": 1.0}},
         flags=["--no-distances"], goal_x_floor=1.5),
    Case("fp8 fractional 0.5/0.5", "ds", {"default": {"a": 0.5, "b": 0.5}}, goal_x_floor=3.0),
]
GOALS = {"chimera_help_s": 0.5, "bf16_speedup_whole": 5.0, "bf16_speedup_minus_startup": 10.0}


def gb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.glob("*.safetensors")) / 1e9


def floor_cmd(a: Path, b: Path, copy_to: Path) -> list[str]:
    return ["bash", "-c", f"cat {a}/*.safetensors {b}/*.safetensors > /dev/null && cp -r {a} {copy_to} "
                          f"&& sync -f {copy_to}/config.json"]


def chimera_recipe(tmp: Path, a: Path, b: Path, weights: dict) -> Path:
    p = tmp / "recipe.yaml"
    p.write_text(yaml.safe_dump({"parents": {"a": str(a), "b": str(b)}, "base": "a", "weights": weights,
                                 "output": {"dtype": "keep", "shard_size": "1GB"}}))
    return p


def mergekit_config(tmp: Path, a: Path, b: Path, weights: dict) -> Path:
    w = weights["default"]
    p = tmp / "mergekit.yaml"
    p.write_text(yaml.safe_dump({"merge_method": "linear", "dtype": "bfloat16",
                                 "models": [{"model": str(a), "parameters": {"weight": w["a"]}},
                                            {"model": str(b), "parameters": {"weight": w["b"]}}]}))
    return p


def compare_outputs(x: Path, y: Path) -> dict:
    """How far chimera's child (x) is from mergekit's (y): identical tensors, largest difference in bf16
    ulps. Under transformers 5 mergekit writes Mixtral's experts in transformers' fused in-memory
    namespace (`mlp.experts.gate_up_proj` [E, 2I, H] = w1 | w3, `down_proj` [E, H, I] = w2); those are
    compared slice by slice with chimera's on-disk names."""
    import re

    import torch
    from safetensors import safe_open

    def tensors(d: Path) -> dict:
        out = {}
        for f in sorted(d.glob("*.safetensors")):
            with safe_open(str(f), "pt") as h:
                out.update({k: h.get_tensor(k) for k in h.keys()})
        return out

    ours, theirs = tensors(x), tensors(y)
    used: set[str] = set()

    def counterpart(k: str):
        if k in theirs:
            used.add(k)
            return theirs[k]
        m = re.match(r"(model\.layers\.\d+\.)block_sparse_moe\.experts\.(\d+)\.(w[123])\.weight$", k)
        if m:
            pre, e, w = m.group(1), int(m.group(2)), m.group(3)
            name = pre + "mlp.experts." + ("down_proj" if w == "w2" else "gate_up_proj")
            used.add(name)
            t = theirs[name][e]
            half = t.shape[0] // 2
            return t if w == "w2" else (t[:half] if w == "w1" else t[half:])
        name = k.replace("block_sparse_moe.gate", "mlp.gate")
        used.add(name)
        return theirs.get(name)

    same = differing = worst = 0
    missing = []
    for k, t in ours.items():
        u = counterpart(k)
        if u is None or u.shape != t.shape:
            missing.append(k)
            continue
        if torch.equal(t.view(torch.int16), u.view(torch.int16)):
            same += 1
            continue
        ulps = (t.view(torch.int16).int() - u.view(torch.int16).int()).abs()   # steps apart (same sign)
        differing += int((ulps > 0).sum())
        worst = max(worst, int(ulps.max()))
    return {"tensors": len(ours), "identical_tensors": same, "differing_elements": differing,
            "max_ulp_diff": worst, "not_found_in_mergekit": missing[:5],
            "only_in_mergekit": sorted(set(theirs) - used)[:5]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--only", default="", help="run the cases whose name contains this")
    ap.add_argument("--data", type=Path, default=DATA)
    ap.add_argument("--no-mergekit", action="store_true")
    ap.add_argument("--note", default="", help="free text stored in the JSON (e.g. what else ran)")
    ap.add_argument("--out", type=Path, default=None, help="scratch folder for outputs (default DATA/out; same "
                                                          "filesystem as the parents, as the floor's copy)")
    args = ap.parse_args()
    tmp = args.out or args.data / "out"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    pairs = {"mx": (args.data / "mx-a", args.data / "mx-b"), "ds": (args.data / "ds-a", args.data / "ds-b")}
    for p in (x for ab in pairs.values() for x in ab):
        if not (p / "config.json").exists():
            sys.exit(f"missing {p}: run python3 benchmarks/make_parents.py {args.data} first")
    mergekit = None
    if not args.no_mergekit:
        from mergekit_env import mergekit_yaml

        mergekit = [str(mergekit_yaml())]

    # start-up: the bare CLI of each tool, and importing torch alone
    reps = max(args.repeat, 5)
    startup = {"chimera_help": summary([run([*CHIMERA, "--help"]) for _ in range(reps)]),
               "python_import_torch": summary([run([sys.executable, "-c", "import torch"]) for _ in range(reps)])}
    if mergekit:
        startup["mergekit_help"] = summary([run([*mergekit, "--help"]) for _ in range(reps)])
    # planning the FP8 pair: a cold architecture cache (transformers' meta model is built: torch + transformers
    # imported) and a warm one (the cached table: neither is imported); the merges below run warm
    a, b = pairs["ds"]
    plan_recipe = chimera_recipe(tmp, a, b, CASES[1].weights)
    cold = []
    for i in range(reps):
        cache = tmp / f"cold-cache-{i}"
        cold.append(run([*CHIMERA, "plan", str(plan_recipe)], env={"CHIMERA_CACHE": str(cache)}))
        shutil.rmtree(cache, ignore_errors=True)
    startup["chimera_plan_fp8_cold_arch_cache"] = summary(cold)
    startup["chimera_plan_fp8_warm"] = summary([run([*CHIMERA, "plan", str(plan_recipe)]) for _ in range(reps)])
    print({k: v["median_s"] for k, v in startup.items()}, flush=True)

    rows = []
    for case in CASES:
        if args.only and args.only not in case.name:
            continue
        a, b = pairs[case.pair]
        subprocess.run(["bash", "-c", f"cat {a}/*.safetensors {b}/*.safetensors > /dev/null"], check=True)  # warm cache
        recipe = chimera_recipe(tmp, a, b, case.weights)
        subprocess.run([*CHIMERA, "plan", str(recipe)], check=True, capture_output=True)  # warm architecture cache
        mk_cfg = mergekit_config(tmp, a, b, case.weights) if (case.mergekit and mergekit) else None
        floors, chim, mk = [], [], []
        for _ in range(args.repeat):
            shutil.rmtree(tmp / "floor", ignore_errors=True)
            floors.append(run(floor_cmd(a, b, tmp / "floor")))
            shutil.rmtree(tmp / "floor", ignore_errors=True)
            shutil.rmtree(tmp / "chimera", ignore_errors=True)
            chim.append(run([*CHIMERA, "merge", str(recipe), "-o", str(tmp / "chimera"), *case.flags]))
            if mk_cfg:
                shutil.rmtree(tmp / "mergekit", ignore_errors=True)
                mk.append(run([*mergekit, str(mk_cfg), str(tmp / "mergekit"), "--no-copy-tokenizer", "--quiet"]))
        row = {"case": case.name, "parent_GB": round(gb(a) + gb(b), 3), "flags": case.flags,
               "floor": summary(floors), "chimera": summary(chim)}
        fl, ch = row["floor"]["median_s"], row["chimera"]["median_s"]
        row["x_floor"] = round(ch / fl, 2)
        row["parent_GB_per_s"] = round(row["parent_GB"] / ch, 3)
        if case.goal_x_floor:
            row["goal_x_floor"] = case.goal_x_floor
            row["met"] = row["x_floor"] <= case.goal_x_floor
        if mk:
            row["mergekit"] = summary(mk)
            m = row["mergekit"]["median_s"]
            ch_up, mk_up = startup["chimera_help"]["median_s"], startup["mergekit_help"]["median_s"]
            row["speedup_whole"] = round(m / ch, 2)
            row["speedup_minus_startup"] = round((m - mk_up) / max(ch - ch_up, 1e-3), 2)
            row["goal_speedup_whole"] = GOALS["bf16_speedup_whole"]
            row["goal_speedup_minus_startup"] = GOALS["bf16_speedup_minus_startup"]
            row["met"] = (row["speedup_whole"] >= GOALS["bf16_speedup_whole"]
                          and row["speedup_minus_startup"] >= GOALS["bf16_speedup_minus_startup"])
            row["vs_mergekit_output"] = compare_outputs(tmp / "chimera", tmp / "mergekit")
        rows.append(row)
        print({k: v for k, v in row.items() if not isinstance(v, dict) or k == "vs_mergekit_output"}, flush=True)
        for d in ("chimera", "mergekit"):
            shutil.rmtree(tmp / d, ignore_errors=True)
    shutil.rmtree(tmp, ignore_errors=True)
    help_s = startup["chimera_help"]["median_s"]
    res = {"note": args.note, "repeat": args.repeat,
           "method": "medians of interleaved fresh-process runs, warm page cache; floor = cat both parents + "
                     "copy one + sync; load1 = 1-minute load average before/after each sample",
           "startup": startup,
           "chimera_help": {"median_s": help_s, "goal_s": GOALS["chimera_help_s"], "met": help_s <= GOALS["chimera_help_s"]},
           "rows": rows}
    print(write_result("merge", res))


if __name__ == "__main__":
    main()
