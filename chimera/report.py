"""A sweep's table drawn: PNG plots (matplotlib Agg), a markdown page, a self-contained HTML page.

    write_report("sweep/")     # -> sweep/report/{README.md, index.html, *.png}

Plots: every headline metric against each varied lambda (95% intervals as bars, parents as dashed
reference lines); accuracy against mean output tokens (the R1T trade-off picture) with the parents
marked; for a 2-D sweep a heatmap per metric. The building blocks (`plot_*`, `markdown_table`,
`md_to_html`) are reused by `scripts/chimera_report.py` for the bundled-model report.
"""
from __future__ import annotations

import base64
import html
import math
import re
from pathlib import Path


LABELS = {
    "accuracy": "accuracy", "think_rate": "<think> rate", "output_tokens_mean": "mean output tokens",
    "output_tokens_p90": "p90 output tokens", "refusal_rate": "refusal rate (sensitive prompts)",
    "reasoning_language": "reasoning in the prompt's language",
}
RATES = {"accuracy", "think_rate", "refusal_rate", "reasoning_language"}
PLOT_METRICS = ("accuracy", "think_rate", "output_tokens_mean", "output_tokens_p90", "refusal_rate",
                "reasoning_language")


def _num(v) -> float | None:
    if v is None or v == "":
        return None
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(f) else f


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def fmt_metric(name: str, v, lo=None, hi=None) -> str:
    v, lo, hi = _num(v), _num(lo), _num(hi)
    if v is None:
        return "-"
    if name in RATES:
        s = f"{100 * v:.0f}%"
        return s + (f" [{100 * lo:.0f}, {100 * hi:.0f}]" if lo is not None and hi is not None else "")
    s = f"{v:.1f}"
    return s + (f" [{lo:.1f}, {hi:.1f}]" if lo is not None and hi is not None else "")


def children(rows: list[dict]) -> list[dict]:
    return [r for r in rows if r.get("kind") == "child"]


def parents(rows: list[dict]) -> list[dict]:
    return [r for r in rows if r.get("kind") == "parent"]


_PARENT_STYLE = [("tab:blue", "*"), ("tab:red", "P"), ("tab:green", "X"), ("tab:purple", "D")]


def plot_metrics(rows: list[dict], axis: str, path: Path, metrics=PLOT_METRICS, group_by: str | None = None,
                 title: str = "") -> Path | None:
    """Each metric vs `axis` (one line per value of `group_by`), with 95% intervals; parents dashed."""
    kids = [r for r in children(rows) if _num(r.get(axis)) is not None]
    metrics = [m for m in metrics if any(_num(r.get(m)) is not None for r in rows)]
    if not kids or not metrics:
        return None
    plt = _plt()
    ncol = min(3, len(metrics))
    nrow = math.ceil(len(metrics) / ncol)
    fig, axs = plt.subplots(nrow, ncol, figsize=(4.2 * ncol, 3.2 * nrow), squeeze=False)
    groups: dict = {}
    for r in kids:
        groups.setdefault(_num(r.get(group_by)) if group_by else None, []).append(r)
    for k, m in enumerate(metrics):
        ax = axs[k // ncol][k % ncol]
        for g, rs in sorted(groups.items(), key=lambda kv: (kv[0] is None, kv[0])):
            rs = sorted((r for r in rs if _num(r.get(m)) is not None), key=lambda r: _num(r[axis]))
            if not rs:
                continue
            x = [_num(r[axis]) for r in rs]
            y = [_num(r[m]) for r in rs]
            lo = [max(0.0, yy - (_num(r.get(f"{m}_lo")) if _num(r.get(f"{m}_lo")) is not None else yy)) for yy, r in zip(y, rs)]
            hi = [max(0.0, (_num(r.get(f"{m}_hi")) if _num(r.get(f"{m}_hi")) is not None else yy) - yy) for yy, r in zip(y, rs)]
            ax.errorbar(x, y, yerr=[lo, hi], marker="o", ms=4, capsize=2, lw=1.5,
                        label=f"{group_by}={g:g}" if group_by else None)
        for i, p in enumerate(parents(rows)):
            v = _num(p.get(m))
            if v is not None:
                c = _PARENT_STYLE[i % len(_PARENT_STYLE)][0]
                ax.axhline(v, ls="--", lw=1, color=c, alpha=0.7, label=f"parent {p['label']}")
        ax.set_xlabel(axis)
        ax.set_title(LABELS.get(m, m), fontsize=10)
        if m in RATES:
            ax.set_ylim(-0.03, 1.03)
        ax.grid(alpha=0.3)
        if k == 0 and ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    for k in range(len(metrics), nrow * ncol):
        axs[k // ncol][k % ncol].axis("off")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_tradeoff(rows: list[dict], path: Path, color_by: str | None = None, title: str = "",
                  extra: list[tuple[str, list[dict]]] = ()) -> Path | None:
    """Accuracy vs mean output tokens: children (coloured by `color_by`), parents as big markers.
    `extra` adds other series (label, rows) drawn as lines, e.g. a second sweep on the same axes."""
    kids = [r for r in children(rows) if _num(r.get("accuracy")) is not None and _num(r.get("output_tokens_mean")) is not None]
    if not kids:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 4.6))

    def err(r, m):
        v, lo, hi = _num(r.get(m)), _num(r.get(f"{m}_lo")), _num(r.get(f"{m}_hi"))
        return [[max(0.0, v - lo) if lo is not None else 0.0], [max(0.0, hi - v) if hi is not None else 0.0]]

    cvals = [_num(r.get(color_by)) for r in kids] if color_by else None
    for r in kids:
        ax.errorbar(_num(r["output_tokens_mean"]), _num(r["accuracy"]), xerr=err(r, "output_tokens_mean"),
                    yerr=err(r, "accuracy"), fmt="none", ecolor="0.75", lw=0.8, zorder=1)
    sc = ax.scatter([_num(r["output_tokens_mean"]) for r in kids], [_num(r["accuracy"]) for r in kids],
                    c=cvals if cvals and all(c is not None for c in cvals) else "tab:gray", cmap="viridis",
                    s=36, zorder=3, label="children")
    if cvals and all(c is not None for c in cvals):
        fig.colorbar(sc, ax=ax, label=color_by)
    for label, rs in extra:
        rs = [r for r in children(rs) if _num(r.get("accuracy")) is not None and _num(r.get("output_tokens_mean")) is not None]
        if rs:
            ax.plot([_num(r["output_tokens_mean"]) for r in rs], [_num(r["accuracy"]) for r in rs], "s--",
                    ms=4, lw=1, alpha=0.8, label=label, zorder=2)
    for i, p in enumerate(parents(rows)):
        x, y = _num(p.get("output_tokens_mean")), _num(p.get("accuracy"))
        if x is None or y is None:
            continue
        c, mk = _PARENT_STYLE[i % len(_PARENT_STYLE)]
        ax.scatter([x], [y], marker=mk, s=220, color=c, edgecolor="k", zorder=4, label=f"parent {p['label']}")
    ax.set_xlabel("mean output tokens (arithmetic)")
    ax.set_ylabel("accuracy (arithmetic)")
    ax.set_ylim(-0.03, 1.03)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    ax.set_title(title or "accuracy vs output tokens")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_heatmap(rows: list[dict], ax1: str, ax2: str, metric: str, path: Path) -> Path | None:
    """A 2-D sweep's metric as a grid (infeasible/missing cells blank)."""
    kids = children(rows)
    xs = sorted({_num(r.get(ax1)) for r in kids if _num(r.get(ax1)) is not None})
    ys = sorted({_num(r.get(ax2)) for r in kids if _num(r.get(ax2)) is not None})
    if len(xs) < 2 or len(ys) < 2:
        return None
    import numpy as np

    grid = np.full((len(ys), len(xs)), np.nan)
    for r in kids:
        x, y, v = _num(r.get(ax1)), _num(r.get(ax2)), _num(r.get(metric))
        if x is not None and y is not None and v is not None:
            grid[ys.index(y), xs.index(x)] = v
    if np.isnan(grid).all():
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(1.0 + 0.55 * len(xs) + 1.5, 1.0 + 0.45 * len(ys) + 0.8))
    vmin, vmax = (0, 1) if metric in RATES else (np.nanmin(grid), np.nanmax(grid))
    im = ax.imshow(grid, origin="lower", aspect="auto", cmap="viridis", vmin=vmin, vmax=vmax)
    ax.set_xticks(range(len(xs)), [f"{x:g}" for x in xs], fontsize=8)
    ax.set_yticks(range(len(ys)), [f"{y:g}" for y in ys], fontsize=8)
    ax.set_xlabel(ax1)
    ax.set_ylabel(ax2)
    for i in range(len(ys)):
        for j in range(len(xs)):
            if not np.isnan(grid[i, j]):
                t = f"{100 * grid[i, j]:.0f}" if metric in RATES else f"{grid[i, j]:.0f}"
                ax.text(j, i, t, ha="center", va="center", fontsize=7,
                        color="w" if (grid[i, j] - vmin) < 0.5 * (vmax - vmin + 1e-12) else "k")
    fig.colorbar(im, ax=ax, label=LABELS.get(metric, metric) + (" (%)" if metric in RATES else ""))
    ax.set_title(LABELS.get(metric, metric))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def markdown_table(rows: list[dict], axes: list[str], metrics=PLOT_METRICS, extra: list[str] = ()) -> str:
    """Parents then children: label, the varied lambdas, each metric as `value [lo, hi]`."""
    head = ["point", *axes, *extra, *[LABELS.get(m, m).replace("<think>", "`<think>`") for m in metrics]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [("**" + str(r["label"]) + "**") if r.get("kind") == "parent" else str(r["label"])]
        cells += ["" if _num(r.get(a)) is None else f"{_num(r[a]):g}" for a in axes]
        cells += ["" if r.get(e) is None else str(r.get(e)) for e in extra]
        cells += [fmt_metric(m, r.get(m), r.get(f"{m}_lo"), r.get(f"{m}_hi")) for m in metrics]
        lines.append("| " + " | ".join(c.replace("|", "/") for c in cells) + " |")
    return "\n".join(lines)


def crossings(rows: list[dict], axis: str, metric: str = "think_rate", low: float = 0.1,
              high: float = 0.9) -> dict:
    """Where `metric` along `axis` (other axes ignored) is last below `low` and first above `high`."""
    pts = sorted((_num(r[axis]), _num(r.get(metric))) for r in children(rows)
                 if _num(r.get(axis)) is not None and _num(r.get(metric)) is not None)
    below = [x for x, v in pts if v < low]
    above = [x for x, v in pts if v > high]
    last_low = max(below) if below else None
    first_high = min((x for x in above if last_low is None or x > last_low), default=None)
    width = first_high - last_low if first_high is not None and last_low is not None else None
    return {"last_below": last_low, "first_above": first_high, "window": width}


def describe_crossing(c: dict, axis: str, metric: str = "`<think>` rate") -> str:
    lo = "never below 10%" if c["last_below"] is None else f"last below 10% at {axis} = {c['last_below']:g}"
    hi = "never above 90%" if c["first_above"] is None else f"first above 90% at {c['first_above']:g}"
    w = f" (window width {c['window']:g})" if c["window"] is not None else ""
    return f"{metric} along `{axis}`: {lo}, {hi}{w}."


# ------------------------------------------------------------------ markdown -> self-contained HTML

_CSS = """body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;
color:#222;line-height:1.45}table{border-collapse:collapse;font-size:13px;margin:1em 0}td,th{border:1px solid #ccc;
padding:3px 7px;text-align:right}th{background:#f2f2f2}td:first-child{text-align:left}img{max-width:100%;
border:1px solid #eee}code,pre{background:#f6f6f6;border-radius:3px}pre{padding:.6em;overflow-x:auto}"""


def _inline(text: str, base: Path) -> str:
    t = html.escape(text, quote=False)
    t = re.sub(r"`([^`]+)`", r"<code>\1</code>", t)
    t = re.sub(r"\*\*([^*]+)\*\*", r"<b>\1</b>", t)

    def img(m):
        p = base / html.unescape(m.group(2))
        if p.is_file():
            data = base64.b64encode(p.read_bytes()).decode()
            return f'<img alt="{m.group(1)}" src="data:image/png;base64,{data}">'
        return m.group(0)

    t = re.sub(r"!\[([^\]]*)\]\(([^)]+)\)", img, t)
    t = re.sub(r"\[([^\]]+)\]\(([^)]+)\)", r'<a href="\2">\1</a>', t)
    return t


def md_to_html(md: str, base: Path, title: str) -> str:
    """The small markdown subset chimera writes (headings, paragraphs, lists, tables, code, images),
    with every local PNG embedded as base64 so the page is one file."""
    out = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
           f"<style>{_CSS}</style></head><body>"]
    lines = md.splitlines()
    i = 0
    while i < len(lines):
        ln = lines[i]
        if ln.startswith("```"):
            j = i + 1
            while j < len(lines) and not lines[j].startswith("```"):
                j += 1
            out.append("<pre><code>" + html.escape("\n".join(lines[i + 1:j])) + "</code></pre>")
            i = j + 1
            continue
        m = re.match(r"(#{1,6})\s+(.*)", ln)
        if m:
            k = len(m.group(1))
            out.append(f"<h{k}>{_inline(m.group(2), base)}</h{k}>")
        elif ln.startswith("|"):
            j = i
            rows = []
            while j < len(lines) and lines[j].startswith("|"):
                rows.append([c.strip() for c in lines[j].strip().strip("|").split("|")])
                j += 1
            out.append("<table>")
            for r_i, r in enumerate(rows):
                if r_i == 1 and all(set(c) <= set("-: ") for c in r):
                    continue
                tag = "th" if r_i == 0 else "td"
                out.append("<tr>" + "".join(f"<{tag}>{_inline(c, base)}</{tag}>" for c in r) + "</tr>")
            out.append("</table>")
            i = j
            continue
        elif re.match(r"\s*[-*] ", ln):
            out.append("<ul>")
            while i < len(lines) and re.match(r"\s*[-*] ", lines[i]):
                out.append("<li>" + _inline(re.sub(r"^\s*[-*] ", "", lines[i]), base) + "</li>")
                i += 1
            out.append("</ul>")
            continue
        elif ln.strip():
            para = [ln]
            while i + 1 < len(lines) and lines[i + 1].strip() and not re.match(r"(#|\||```|\s*[-*] )", lines[i + 1]):
                i += 1
                para.append(lines[i])
            out.append("<p>" + _inline(" ".join(para), base) + "</p>")
        i += 1
    out.append("</body></html>")
    return "\n".join(out)


# ------------------------------------------------------------------ one sweep's report

def sweep_figures(rows: list[dict], axes: list[str], out: Path, prefix: str = "") -> list[tuple[str, Path]]:
    """Every plot of one sweep into `out`: [(caption, path)]."""
    figs: list[tuple[str, Path]] = []
    for k, a in enumerate(axes):
        other = next((b for b in axes if b != a), None)
        p = plot_metrics(rows, a, out / f"{prefix}metrics_vs_{_safe(a)}.png", group_by=other,
                         title=f"metrics vs {a}")
        if p:
            figs.append((f"Metrics vs {a}", p))
    p = plot_tradeoff(rows, out / f"{prefix}tradeoff.png", color_by=axes[0] if axes else None)
    if p:
        figs.append(("Accuracy vs mean output tokens (parents marked)", p))
    if len(axes) >= 2:
        for m in ("accuracy", "think_rate", "output_tokens_mean"):
            p = plot_heatmap(rows, axes[0], axes[1], m, out / f"{prefix}heatmap_{m}.png")
            if p:
                figs.append((f"{LABELS[m]} over {axes[0]} x {axes[1]}", p))
    return figs


def _safe(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", s)


def write_report(sweep_dir: str | Path, out: str | Path | None = None, title: str | None = None) -> Path:
    """README.md + index.html + PNGs for one sweep directory; returns the HTML page's path."""
    from chimera.sweep import load_table

    rows, manifest = load_table(sweep_dir)
    sweep_dir = Path(sweep_dir)
    out = Path(out) if out else sweep_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    axes = [a["name"] for a in manifest["axes"]]
    figs = sweep_figures(rows, axes, out)
    s = manifest["settings"]
    title = title or f"chimera sweep: {', '.join(axes)}"
    md = [f"# {title}", "",
          f"Parents: {', '.join(f'`{p}`' for p in manifest['parents'])} (base `{manifest['base']}`). "
          f"Suites: {', '.join(Path(x).stem for x in s['suites'])}; n = {s['n'] or 'all'} per suite; "
          f"max_new_tokens = {s['max_new_tokens']}; temperature = {s['temperature']}. "
          "Values are point estimates with 95% intervals (Wilson for rates, bootstrap for token counts).", ""]
    if any(not a.startswith("threshold") for a in axes):
        for a in axes:
            if a.startswith("threshold"):
                continue
            c = crossings(rows, a)
            md.append("- " + describe_crossing(c, a))
        md.append("")
    extra = ["tensors_mixed", "tensors_from_base"] if any(a.startswith("threshold") for a in axes) else []
    md += ["## Table", "", markdown_table(rows, axes, extra=extra), "",
           "Full table: `table.csv` / `table.json` in the sweep directory.", ""]
    for cap, p in figs:
        md += [f"## {cap}", "", f"![{cap}]({p.name})", ""]
    text = "\n".join(md)
    (out / "README.md").write_text(text)
    page = out / "index.html"
    page.write_text(md_to_html(text, out, title))
    return page


__all__ = ["write_report", "plot_metrics", "plot_tradeoff", "plot_heatmap", "markdown_table", "md_to_html",
           "crossings", "sweep_figures", "fmt_metric", "describe_crossing"]
