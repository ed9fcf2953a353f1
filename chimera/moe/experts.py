"""Expert lists as users write them, parsed without torch (so a command checks them before loading a model).

    parse_experts("12:7,14:3")        -> [(12, 7), (14, 3)]         layer:expert
    parse_experts("@ftri.json:10")    -> the top 10 of an fTRI result file
"""
from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable
from pathlib import Path

from chimera.errors import ChimeraError

MODES = ("replace", "drop")

_PAIR_RE = re.compile(r"^\s*(-?\d+)\s*:\s*(-?\d+)\s*$")

Expert = tuple[int, int]


def read_ftri_ranking(path: str | os.PathLike) -> list[Expert]:
    """The ranked experts `(layer, expert)` of an fTRI result file (best first)."""
    p = Path(path)
    if not p.is_file():
        raise ChimeraError(f"{p}: fTRI result file not found")
    try:
        data = json.loads(p.read_text())
    except (OSError, ValueError) as e:
        raise ChimeraError(f"{p}: not a JSON fTRI result ({e.__class__.__name__})") from None
    rows = data.get("ranking") if isinstance(data, dict) else None
    if rows is None and isinstance(data, dict):
        rows = data.get("top")
    if not isinstance(rows, list):
        raise ChimeraError(f"{p}: no 'ranking' list in fTRI result")
    out: list[Expert] = []
    for r in rows:
        if isinstance(r, dict):
            out.append((int(r["layer"]), int(r["expert"])))
        elif isinstance(r, (list, tuple)) and len(r) >= 2:
            out.append((int(r[0]), int(r[1])))
        else:
            raise ChimeraError(f"{p}: bad ranking entry {r!r}")
    return out


def parse_experts(spec: str | Iterable | None) -> list[Expert]:
    """Parse an expert list: "12:7,14:3" (layer:expert) and/or "@ftri.json:10" (top 10 of an fTRI file;
    "@ftri.json" alone takes the file's whole `top` list). Duplicates are dropped, order kept."""
    if spec is None:
        return []
    if not isinstance(spec, str):
        out = []
        for item in spec:
            if isinstance(item, str):
                out.extend(parse_experts(item))
            else:
                try:
                    layer, expert = item
                    out.append((int(layer), int(expert)))
                except (TypeError, ValueError):
                    raise ChimeraError(f"bad expert {item!r}: expected (layer, expert)") from None
        return list(dict.fromkeys(out))
    out: list[Expert] = []
    for part in spec.split(","):
        part = part.strip()
        if not part:
            continue
        if part.startswith("@"):
            ref = part[1:]
            k = None
            head, sep, tail = ref.rpartition(":")
            if sep and tail.strip().isdigit():
                ref, k = head, int(tail)
            ranking = read_ftri_ranking(ref)
            if k is None:
                data = json.loads(Path(ref).read_text())
                k = len(data.get("top", ranking))
            if k > len(ranking):
                raise ChimeraError(f"{ref}: asked for the top {k} experts but the file ranks only {len(ranking)}")
            out.extend(ranking[:k])
            continue
        m = _PAIR_RE.match(part)
        if not m:
            raise ChimeraError(f"bad expert '{part}': expected LAYER:EXPERT (e.g. 12:7) or @ftri.json:K")
        out.append((int(m.group(1)), int(m.group(2))))
    return list(dict.fromkeys(out))
