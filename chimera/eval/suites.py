"""Suites are JSONL files: one object a line with `prompt` (required) and optionally `answer`,
`match` (number | contains | exact), `lang` (en | de ...), `split` (a group name reported separately),
`sensitive` (bool). Bundled suites live in `chimera/eval/suites/`; any other path works too.
"""
from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

from chimera.errors import ChimeraError

SUITES_DIR = Path(__file__).resolve().parent / "suites"
BUILTIN = ("arithmetic", "sensitive", "language")


def resolve(names: str | list[str]) -> list[str]:
    """'all' -> every built-in suite; 'a,b' -> ['a', 'b']; paths kept as they are."""
    if isinstance(names, str):
        names = [n for n in names.split(",") if n.strip()]
    out = []
    for n in names:
        n = n.strip()
        out.extend(BUILTIN if n == "all" else [n])
    if not out:
        raise ChimeraError("no suite given (use arithmetic, sensitive, language, all or a .jsonl path)")
    return out


def suite_path(name: str) -> Path:
    if name in BUILTIN:
        return SUITES_DIR / f"{name}.jsonl"
    p = Path(name)
    if p.suffix == ".jsonl" or p.exists() or "/" in name:
        if not p.is_file():
            raise ChimeraError(f"{p}: suite file not found")
        return p
    raise ChimeraError(f"unknown suite {name!r} (one of {', '.join(BUILTIN)}, all, or a .jsonl file)")


def read_jsonl(path: Path, what: str = "file") -> Iterator[tuple[int, object]]:
    """(line number, parsed value) for every non-blank line; a missing file or a bad line is a one-line
    error naming file:line."""
    if not path.is_file():
        raise ChimeraError(f"{path}: {what} not found")
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            yield lineno, json.loads(line)
        except json.JSONDecodeError as e:
            raise ChimeraError(f"{path}:{lineno}: malformed JSON ({e.msg})") from None


def load(name: str) -> list[dict]:
    """The items of a suite; a bad line raises a one-line error naming file:line."""
    path = suite_path(name)
    items = []
    for lineno, item in read_jsonl(path, "suite file"):
        if not isinstance(item, dict):
            raise ChimeraError(f"{path}:{lineno}: expected a JSON object")
        if not isinstance(item.get("prompt"), str) or not item["prompt"].strip():
            raise ChimeraError(f"{path}:{lineno}: missing 'prompt' (a non-empty string)")
        if "answer" in item and item["answer"] is not None and not isinstance(item["answer"], (str, int)):
            raise ChimeraError(f"{path}:{lineno}: 'answer' must be a string or an integer")
        items.append(item)
    if not items:
        raise ChimeraError(f"{path}: suite has no items")
    return items


MIN_PER_SPLIT = 5  # a sampled split gets at least this many items (or all of them when it has fewer)


def allocate(n: int, sizes: dict) -> dict:
    """How many of `n` items each split gets: in proportion to its size, at least MIN_PER_SPLIT each
    (largest shortfall first, one item at a time); when n cannot give every split its minimum, n is
    dealt out round-robin from the largest split."""
    q = {s: min(size, MIN_PER_SPLIT) for s, size in sizes.items()}
    order = sorted(sizes, key=lambda s: -sizes[s])
    if sum(q.values()) > n:
        q = dict.fromkeys(sizes, 0)
        left = n
        while left:
            for s in order:
                if left and q[s] < sizes[s]:
                    q[s] += 1
                    left -= 1
        return q
    total = sum(sizes.values())
    for _ in range(n - sum(q.values())):
        s = max((s for s in order if q[s] < sizes[s]), key=lambda s: n * sizes[s] / total - q[s])
        q[s] += 1
    return q


def sample(items: list[dict], n: int | None) -> list[dict]:
    """n items, every split (`split` field) represented in proportion to its size and by at least
    MIN_PER_SPLIT items (see `allocate`), spread evenly over each split in file order; or all of them."""
    if n is None or n >= len(items):
        return list(items)
    if n <= 0:
        raise ChimeraError(f"--n must be positive, got {n}")
    groups: dict = {}
    for i, it in enumerate(items):
        groups.setdefault(it.get("split"), []).append(i)
    quota = allocate(n, {s: len(ix) for s, ix in groups.items()})
    chosen = [ix[(j * len(ix)) // quota[s]] for s, ix in groups.items() for j in range(quota[s])]
    return [items[i] for i in sorted(chosen)]


def write_builtin(suites: dict[str, list[dict]], out_dir: Path = SUITES_DIR) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, items in suites.items():
        with open(out_dir / f"{name}.jsonl", "w", encoding="utf-8") as f:
            for it in items:
                f.write(json.dumps(it, ensure_ascii=False) + "\n")
