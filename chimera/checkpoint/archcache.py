"""The architecture derivation's answers as data, so that planning a merge needs no torch on a warm cache.

`arch.of(config)` (the source of truth) builds transformers' model on the meta device: importing torch and
transformers and building the model costs 4-8 s per plan. What planning needs from it is small: for every
on-disk tensor name its `Role` (class, layer, expert, fused), and the routed-expert count of each MoE
layer. `table(config, names)` returns exactly that, from a pattern table:

    pattern   the name with its decoder-layer index and routed-expert index abstracted:
              model.layers.3.mlp.experts.17.w1.weight -> model.layers.{L}.mlp.experts.{E}.w1.weight
    runs      per pattern, the layers L it was seen at, in runs [lo, hi] sharing one answer
              (class, fused, layer = L + d or a fixed layer, the highest expert index seen)

The table holds only what the derivation answered for names it was asked about: a name whose pattern,
layer or expert index it has not seen is a miss, which runs the derivation (torch) and adds the answers.
Expert indices are abstracted the way the derivation's own memo (`Arch.role`) abstracts them, so a hit
is the derivation's answer by construction.

Entries live in `$CHIMERA_CACHE/arch/` (default `$XDG_CACHE_HOME/chimera` or `~/.cache/chimera`), one JSON
file per key. The key is everything the derivation reads: the config's `model_type`, `architectures` and
every other key it passes to transformers' config class (all but `arch._CONFIG_DROP`), the installed
transformers and torch versions, and a digest of the derivation's own source (`arch.py`, this file). An
entry written under another version or config has another file name and is never read; a file whose
stored key differs from the one asked for (a hash collision, an edited file) is ignored. Files are
written to a temporary name and renamed, so concurrent planners never see half an entry.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
import threading
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

from chimera.cache import cache_root
from chimera.checkpoint.arch import _CONFIG_DROP, _EXPERT_INDEX_RE, _LAYER_RE, Role

SCHEMA = 1
_SOURCES = (Path(__file__).with_name("arch.py"), Path(__file__))
_lock = threading.Lock()
_memo: dict[str, "Table"] = {}


def cache_dir() -> Path:
    return cache_root() / "arch"


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "none"


def key(config: dict) -> dict:
    """Everything the derivation's answer depends on (see the module docstring)."""
    digest = hashlib.sha256(b"".join(p.read_bytes() for p in _SOURCES)).hexdigest()[:16]
    return {"schema": SCHEMA, "derivation": digest, "transformers": _version("transformers"),
            "torch": _version("torch"), "model_type": config.get("model_type"),
            "architectures": config.get("architectures"),
            "config": {k: v for k, v in config.items() if k not in _CONFIG_DROP}}


def _key_id(k: dict) -> str:
    blob = json.dumps(k, sort_keys=True, default=str)
    return f"{re.sub(r'[^A-Za-z0-9_.-]', '_', str(k['model_type']))}-{hashlib.sha256(blob.encode()).hexdigest()[:24]}"


def split(name: str) -> tuple[str, int | None, int | None]:
    """(pattern, layer index L, expert index E) of an on-disk name (see the module docstring)."""
    e = None
    m = _EXPERT_INDEX_RE.search(name)
    if m is not None:
        e = int(m.group(1))
        name = name[: m.start(1)] + "{E}" + name[m.end(1):]
    layer = None
    m = _LAYER_RE.search(name)
    if m is not None:
        layer = int(m.group(1))
        name = name[: m.start(1)] + "{L}" + name[m.end(1):]
    return name, layer, e


@dataclass
class Table:
    """What planning asks the architecture: `role(name)`, `num_experts(layer)`, `moe` (MoE layer -> experts)."""

    model_type: str
    n_layers: int
    moe: dict[int, int]
    # pattern -> runs [lo, hi, class or None, fused, d, fixed layer or None, highest expert]; lo = hi = -1 for a
    # pattern without a layer index; the role's layer is L + d when d is not None, else the fixed layer
    patterns: dict[str, list[list]] = field(default_factory=dict)

    def _run(self, name: str) -> tuple[list | None, int | None, int | None]:
        pat, L, e = split(name)
        at = -1 if L is None else L
        for run in self.patterns.get(pat, ()):
            if run[0] <= at <= run[1] and (e is None or e <= run[6]):
                return run, L, e
        return None, L, e

    def covers(self, names) -> bool:
        return all(self._run(n)[0] is not None for n in names)

    def role(self, name: str) -> Role | None:
        run, L, e = self._run(name)
        if run is None:
            raise KeyError(name)
        _, _, cls, fused, d, fixed, _ = run
        if cls is None:
            return None
        layer = L + d if d is not None else fixed
        return Role(cls, layer, e if cls == "routed_experts" else None, fused)

    def num_experts(self, layer: int) -> int:
        """Routed experts of an MoE layer (an MTP layer: those of the last MoE layer), as `Arch.num_experts`."""
        return self.moe[layer if layer in self.moe else max(self.moe)]

    def add(self, answers: dict[str, Role | None]) -> None:
        """Fold the derivation's answers for some names into the runs."""
        cells: dict[str, dict[int, tuple]] = {}
        for pat, runs in self.patterns.items():
            for lo, hi, *val in runs:
                for at in range(lo, hi + 1):
                    cells.setdefault(pat, {})[at] = tuple(val)
        for name, r in answers.items():
            pat, L, e = split(name)
            at = -1 if L is None else L
            if r is None:
                val = (None, False, None, None, -1)
            elif L is not None and r.layer is not None:
                val = (r.cls, r.fused, r.layer - L, None, -1)
            else:
                val = (r.cls, r.fused, None, r.layer, -1)
            old = cells.setdefault(pat, {}).get(at)
            top = max(e if e is not None else -1, old[4] if old and old[:4] == val[:4] else -1)
            cells[pat][at] = (*val[:4], top)
        self.patterns = {}
        for pat, by in sorted(cells.items()):
            runs: list[list] = []
            for at in sorted(by):
                if runs and runs[-1][1] == at - 1 and tuple(runs[-1][2:]) == by[at]:
                    runs[-1][1] = at
                else:
                    runs.append([at, at, *by[at]])
            self.patterns[pat] = runs

    def to_json(self, k: dict) -> dict:
        return {"key": k, "model_type": self.model_type, "n_layers": self.n_layers,
                "moe": {str(L): E for L, E in self.moe.items()}, "patterns": self.patterns}

    @classmethod
    def from_json(cls, d: dict) -> Table:
        return cls(d["model_type"], int(d["n_layers"]), {int(L): int(E) for L, E in d["moe"].items()},
                   {p: [list(r) for r in runs] for p, runs in d["patterns"].items()})


def _load(path: Path, k: dict) -> Table | None:
    try:
        d = json.loads(path.read_text())
        if d.get("key") != json.loads(json.dumps(k, default=str)):
            return None
        return Table.from_json(d)
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def _store(path: Path, t: Table, k: dict) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".partial")
        with os.fdopen(fd, "w") as f:
            json.dump(t.to_json(k), f, sort_keys=True, default=str, separators=(",", ":"))
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only or full cache only costs the next plan a derivation


def derive(config: dict, names) -> dict[str, Role | None]:
    """The derivation's answers (`arch.of`, torch + transformers): name -> Role without the in-memory name."""
    from chimera.checkpoint import arch

    a = arch.of(config)
    out = {}
    for n in names:
        r = a.role(n)
        out[n] = None if r is None else Role(r.cls, r.layer, r.expert, r.fused)
    return out


def table(config: dict, names) -> Table:
    """The roles of `names` under `config`: from the cache when it holds every name, else derived (and cached)."""
    from chimera.checkpoint import arch

    names = list(names)
    k = key(config)
    kid = _key_id(k)
    path = cache_dir() / f"{kid}.json"
    with _lock:
        t = _memo.get(kid)
        if t is None:
            t = _load(path, k)
        if t is not None and t.covers(names):
            _memo[kid] = t
            return t
        a = arch.of(config)
        if t is None:
            t = Table(a.model_type, a.n_layers, {L: b.num_experts for L, b in a.moe.items()})
        t.add(derive(config, [n for n in names if t._run(n)[0] is None]))
        _store(path, t, k)
        _memo[kid] = t
        return t
