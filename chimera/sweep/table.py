"""A sweep's table: one row per point (identity, lambdas, headline metrics with 95% intervals, then
every suite metric), written as `OUT/table.csv` and `OUT/table.json`."""
from __future__ import annotations

import csv
import json
import os
from pathlib import Path

from chimera.errors import ChimeraError
from chimera.sweep.grid import fmt_value
from chimera.sweep.runner import MANIFEST, POINTS_DIR, json_default

HEADLINE = ("accuracy", "think_rate", "output_tokens_mean", "output_tokens_p90", "refusal_rate",
            "reasoning_language")
# where each headline metric is read from (first suite/split present wins; else the first suite with it)
HEADLINE_SOURCES = {
    "accuracy": ["arithmetic"], "think_rate": ["arithmetic"], "output_tokens_mean": ["arithmetic"],
    "output_tokens_p90": ["arithmetic"], "refusal_rate": ["sensitive/sensitive", "sensitive"],
    "reasoning_language": ["language"],
}


def metric(report: dict, name: str) -> dict | None:
    """A headline metric's {value, lo, hi, n} from a harness report (see HEADLINE_SOURCES)."""
    for src in HEADLINE_SOURCES.get(name, []):
        suite, _, split = src.partition("/")
        entry = report.get(suite)
        if entry is None:
            continue
        ms = entry["splits"].get(split, {}) if split else entry["metrics"]
        if name in ms:
            return ms[name]
    for entry in report.values():
        if name in entry["metrics"]:
            return entry["metrics"][name]
    return None


def weights_text(recipe: dict | None) -> str:
    if not recipe:
        return ""
    parts = []
    for cls, vec in recipe["weights"].items():
        parts.append(f"{cls}: " + " ".join(f"{p}={fmt_value(v)}" for p, v in vec.items()))
    return "; ".join(parts)


def row(rec: dict, axes: list[str]) -> dict:
    """One table row: identity, lambdas, headline metrics with intervals, then every suite metric."""
    r: dict = {"point": rec["id"], "kind": rec["kind"], "label": rec["label"]}
    for a in axes:
        r[a] = rec["coords"].get(a)
    r["weights"] = weights_text(rec.get("recipe"))
    th = (rec.get("recipe") or {}).get("threshold")
    r["delta"] = th["delta"] if th else None
    m = rec.get("merge") or {}
    r["tensors_mixed"] = m.get("tensors_mixed")
    r["tensors_from_base"] = m.get("tensors_from_base")
    for name in HEADLINE:
        v = metric(rec["report"], name)
        r[name] = v["value"] if v else None
        r[f"{name}_lo"] = v["lo"] if v else None
        r[f"{name}_hi"] = v["hi"] if v else None
        r[f"{name}_n"] = v["n"] if v else None
    for suite, entry in rec["report"].items():
        for name, v in entry["metrics"].items():
            r[f"{suite}.{name}"] = v["value"]
            r[f"{suite}.{name}_lo"] = v["lo"]
            r[f"{suite}.{name}_hi"] = v["hi"]
    r["seconds"] = rec.get("seconds")
    return r


def write_table(rows: list[dict], out: Path) -> None:
    cols: list[str] = []
    for r in rows:
        cols += [c for c in r if c not in cols]
    with open(out / "table.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        for r in rows:
            w.writerow({c: ("" if r.get(c) is None else r.get(c)) for c in cols})
    tmp = out / "table.json.partial"
    tmp.write_text(json.dumps(rows, indent=1, default=json_default, allow_nan=True))
    os.replace(tmp, out / "table.json")


def load_table(sweep_dir: str | Path) -> tuple[list[dict], dict]:
    """(rows, manifest) of a finished (or partly finished) sweep directory."""
    d = Path(sweep_dir)
    if not (d / MANIFEST).is_file():
        raise ChimeraError(f"{d}: not a sweep directory (no {MANIFEST})")
    manifest = json.loads((d / MANIFEST).read_text())
    if (d / "table.json").is_file():
        return json.loads((d / "table.json").read_text()), manifest
    axes = [a["name"] for a in manifest["axes"]]
    recs = [json.loads(f.read_text()) for f in (d / POINTS_DIR).glob("*.json")]
    recs.sort(key=lambda r: (r["kind"] != "parent",
                             [r["coords"].get(a, -1.0) for a in axes] if r["kind"] == "child" else [],
                             manifest["parents"].index(r["label"]) if r["label"] in manifest["parents"] else 0))
    rows = [row(r, axes) for r in recs]
    if not rows:
        raise ChimeraError(f"{d}: no finished points yet")
    return rows, manifest
