"""The family's acceptance table (issue 9) on the full held-out suites, and each child's report.

    .venv/bin/python scripts/zoo_acceptance.py [--models DIR] [--out docs/zoo-acceptance.json]

Runs `chimera.zoo.train.acceptance()` (greedy, max_new_tokens 256, every item of every bundled suite) and
prints the Markdown tables quoted in docs/model-family.md.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from chimera.zoo import family, train  # noqa: E402


def fmt(name: str, m: dict) -> str:
    if not m or not m.get("n"):
        return "-"
    if name.startswith("output_tokens"):
        return f"{m['value']:.1f} [{m['lo']:.1f}, {m['hi']:.1f}] (n={m['n']})"
    return f"{100 * m['value']:.1f}% [{100 * m['lo']:.1f}, {100 * m['hi']:.1f}] (n={m['n']})"


def measured(label: str, v: float) -> str:
    if "points" in label or "minus" in label:
        return f"{100 * v:+.1f} points"
    if "/" in label:
        return f"{v:.2f}x"
    return f"{100 * v:.1f}%"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", type=Path, default=family.MODELS_DIR)
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "zoo-acceptance.json")
    a = ap.parse_args()
    import torch

    torch.set_num_threads(1)
    t0 = time.time()
    reports, rows = train.acceptance(a.models)
    lines = ["| criterion | target | measured | pass |", "| --- | --- | --- | --- |"]
    lines += [f"| {r['criterion']} | {r['target']} | {measured(r['criterion'], r['measured'])} | "
              f"{'yes' if r['pass'] else '**no**'} |" for r in rows]
    cols = ("accuracy", "think_rate", "refusal_rate", "reasoning_language", "output_tokens_mean", "output_tokens_p90")
    lines += ["", "| model | suite / split | " + " | ".join(cols) + " |", "| --- | --- |" + " --- |" * len(cols)]
    for name, rep in reports.items():
        for suite, entry in rep.items():
            for split, ms in [("all", entry["metrics"])] + sorted(entry["splits"].items()):
                lines.append(f"| {name} | {suite} / {split} | " + " | ".join(fmt(c, ms.get(c)) for c in cols) + " |")
    text = "\n".join(lines)
    slim = {name: {s: {"metrics": e["metrics"], "splits": e["splits"]} for s, e in rep.items()} for name, rep in reports.items()}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps({"rows": rows, "reports": slim, "seconds": round(time.time() - t0, 1)}, indent=1) + "\n")
    a.out.with_suffix(".table.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
