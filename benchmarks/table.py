"""The README's performance tables, generated from the benchmark results (never copied by hand).

    .venv/bin/python benchmarks/table.py [--merge RESULT.json] [--kernels RESULT.json] [--readme]

Prints the markdown; with --readme replaces the blocks between `<!-- bench:merge -->` and
`<!-- /bench:merge -->` (bench_merge.py) and `<!-- bench:kernels -->` ... (bench_kernels.py) in README.md.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parent


def _s(x: dict) -> str:
    return f"{x['median_s']:.2f} s"


def _load(x: dict) -> str:
    return f"{x['load1_max']:.1f}"


def markdown(res: dict) -> str:
    st = res["startup"]
    lines = [f"Measured {res['utc']} on {res['machine'].get('cpus')} cores ({res['machine'].get('cpu', '?')}), "
             f"commit {res['machine'].get('git', '?')}; medians of {res['repeat']} interleaved runs, warm page "
             f"cache, whole process. Source: `benchmarks/results/{res['benchmark']}-{res['utc']}.json`."
             + (f" Note: {res['note']}" if res.get("note") else ""), "",
             "| case | parents | floor | chimera | x floor | mergekit | speedup (whole / minus start-up) "
             "| peak RSS chimera | goal | met | max load |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in res["rows"]:
        mk = r.get("mergekit")
        goal = (f"<= {r['goal_x_floor']}x floor" if r.get("goal_x_floor")
                else f">= {r['goal_speedup_whole']:g}x / >= {r['goal_speedup_minus_startup']:g}x" if mk else "")
        loads = [r["floor"]["load1_max"], r["chimera"]["load1_max"]] + ([mk["load1_max"]] if mk else [])
        lines.append(
            f"| {r['case']} | {r['parent_GB']:.2f} GB | {_s(r['floor'])} | {_s(r['chimera'])} | {r['x_floor']:.2f}x "
            f"| {_s(mk) if mk else '-'} | "
            + (f"{r['speedup_whole']:.1f}x / {r['speedup_minus_startup']:.1f}x" if mk else "-")
            + f" | {r['chimera']['peak_rss_GB']:.2f} GB | {goal} | {'yes' if r.get('met') else '**no**'} "
            f"| {max(loads):.1f} |")
    ch = res["chimera_help"]
    lines += ["", f"Start-up (median): `chimera --help` {ch['median_s']:.2f} s (goal <= {ch['goal_s']} s: "
              f"{'met' if ch['met'] else '**not met**'}), `import torch` {st['python_import_torch']['median_s']:.2f} s"
              + (f", `mergekit-yaml --help` {st['mergekit_help']['median_s']:.2f} s" if "mergekit_help" in st else "")
              + "."]
    if "chimera_plan_fp8_warm" in st:
        cold, warm = st["chimera_plan_fp8_cold_arch_cache"], st["chimera_plan_fp8_warm"]
        lines.append(f"`chimera plan` of the FP8 pair (whole process): {cold['median_s']:.2f} s with an empty "
                     f"architecture cache (the derivation: torch + transformers' meta model), {warm['median_s']:.2f} s "
                     f"warm (no torch), max load {max(cold['load1_max'], warm['load1_max']):.1f}.")
    for r in res["rows"]:
        if "vs_mergekit_output" in r:
            v = r["vs_mergekit_output"]
            lines.append(f"{r['case']}: chimera's child vs mergekit's: {v['identical_tensors']} of {v['tensors']} "
                         f"tensors identical, {v['differing_elements']} elements differ, by at most "
                         f"{v['max_ulp_diff']} bf16 ulp.")
    return "\n".join(lines)


def kernels_markdown(res: dict) -> str:
    rows = res["rows"]
    lines = [f"Measured {res['utc']}, one chunk of {res['chunk'][0]} x {res['chunk'][1]}, {res['threads']} threads, "
             f"medians (`benchmarks/results/{res['benchmark']}-{res['utc']}.json`):", "",
             "| kernel | Gparam/s | time vs a plain copy of the chunk | max load |", "| --- | --- | --- | --- |"]
    for name, r in rows.items():
        lines.append(f"| {name} | {r['Gparam_per_s']:.3f} | {r['x_copy_time']:.2f}x | {r['load1_max']:.1f} |")
    return "\n".join(lines)


def replace_block(text: str, tag: str, md: str) -> str:
    begin, end = f"<!-- bench:{tag} -->", f"<!-- /bench:{tag} -->"
    if begin not in text or end not in text:
        raise SystemExit(f"README.md has no {begin} ... {end} block")
    head, rest = text.split(begin, 1)
    _, tail = rest.split(end, 1)
    return f"{head}{begin}\n{md}\n{end}{tail}"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--merge", type=Path, default=ROOT / "results" / "merge.json")
    ap.add_argument("--kernels", type=Path, default=ROOT / "results" / "kernels.json")
    ap.add_argument("--readme", action="store_true")
    args = ap.parse_args()
    blocks = {"merge": markdown(json.loads(args.merge.read_text()))}
    if args.kernels.exists():
        blocks["kernels"] = kernels_markdown(json.loads(args.kernels.read_text()))
    for md in blocks.values():
        print(md, end="\n\n")
    if args.readme:
        readme = ROOT.parent / "README.md"
        text = readme.read_text()
        for tag, md in blocks.items():
            text = replace_block(text, tag, md)
        readme.write_text(text)


if __name__ == "__main__":
    main()
