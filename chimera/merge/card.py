"""What an output says about itself: the model card (README.md with Hub metadata), the recipe copy
(chimera_recipe.yaml) and the record (chimera_merge.json).

Cards name models, never local paths: `base_model:` lists each parent's hub id or folder name
(`chimera.resolve.model_name`), and the card's recipe shows parents by those names (the recipe as
given is `chimera_recipe.yaml`).

A conversion (`chimera convert`, a one-parent merge whose recipe carries `lineage`) keeps the source's
provenance: converting a merged child keeps its card, recipe and record and adds a `conversions` entry
and a card section; converting any other model writes a card that names the source.
"""
from __future__ import annotations

import re
from pathlib import Path

import yaml

from chimera.merge.plan import Plan
from chimera.resolve import model_name

DTYPE_WORDS = {"bfloat16": "bfloat16", "float32": "float32", "float8": "block FP8", "keep": "the source's dtypes"}
HOW = {"float8": "attention, MLP and expert projections quantized to DeepSeek block FP8 (e4m3, one float32 scale "
                 "per 128x128 block, `weight_scale_inv`); embeddings, lm_head, norms and routers keep their dtype",
       "bfloat16": "every tensor stored as bfloat16; FP8 weights dequantized exactly first "
                   "(`W = q * s[i//128, j//128]`)",
       "float32": "every tensor stored as float32; FP8 weights dequantized exactly (`W = q * s[i//128, j//128]`)"}


def _front(meta: dict) -> list[str]:
    return ["---", yaml.safe_dump(meta, sort_keys=False).strip(), "---", ""]


def _ops_table(ops: dict[str, int]) -> list[str]:
    return ["| operation | tensors |", "| --- | --- |", *[f"| {op} | {n} |" for op, n in sorted(ops.items())], ""]


def merge_card(plan: Plan, ops: dict[str, int], distances: bool = True) -> str:
    r = plan.recipe
    names = {k: model_name(p) for k, p in r.parents.items()}
    meta = {"base_model": list(dict.fromkeys(names.values())), "base_model_relation": "merge",
            "library_name": "transformers", "tags": ["chimera", "merge", "assembly-of-experts", "moe", plan.arch]}
    shown = r.to_dict()
    shown["parents"] = names
    return "\n".join([
        *_front(meta),
        f"# Assembly-of-Experts merge of {', '.join(names.values())}", "",
        f"Built by chimera from {len(r.parents)} parent(s) of architecture `{plan.arch}`; config, tokenizer "
        f"and every unmerged tensor come from the base parent `{r.base}` ({names[r.base]}).", "",
        "Every tensor W_t is `sum_i lambda_i W_t(parent_i)` with lambdas per tensor class "
        "(a single lambda of 1 copies the parent's stored bytes verbatim).", "",
        *_ops_table(ops),
        *([f"The parents differ in `{'`, `'.join(plan.resolved)}`; the child has the base's values "
           "(`use_base_config`), and tensors stored in another quantization format were converted to "
           "the child's.", ""] if plan.resolved else []),
        "## Recipe", "", "Parents by name (the recipe as given: `chimera_recipe.yaml`).", "",
        "```yaml", yaml.safe_dump(shown, sort_keys=False).strip(), "```", "",
        (f"Per-tensor operations and {plan.metric} distances of the parents to the base: `chimera_merge.json`."
         if distances else "Per-tensor operations: `chimera_merge.json` (distances were not measured)."), "",
    ])


def conversion_entry(plan: Plan, ops: dict[str, int]) -> dict:
    from chimera import __version__

    lin = plan.recipe.lineage or {}
    return {"tool": f"chimera {__version__} convert", "from": lin.get("source"), "dtype": plan.recipe.dtype,
            "plan_id": plan.plan_id, "ops": dict(sorted(ops.items()))}


def conversions_section(conversions: list[dict]) -> list[str]:
    rows = [f"| {i + 1} | {c.get('from')} | {DTYPE_WORDS.get(c.get('dtype'), c.get('dtype'))} | "
            f"{', '.join(f'{n} {op}' for op, n in (c.get('ops') or {}).items())} |"
            for i, c in enumerate(conversions)]
    return ["## Conversions", "",
            "Converted by `chimera convert`, in this order; each step's plan id and operations are in "
            "`chimera_merge.json` (`conversions`).", "",
            "| step | from | to | tensors |", "| --- | --- | --- | --- |", *rows, ""]


def _strip_section(text: str, heading: str) -> str:
    """`text` without the markdown section `## heading` (up to the next `## ` heading)."""
    return re.sub(rf"(?ms)^## {re.escape(heading)}\n.*?(?=^## |\Z)", "", text).rstrip() + "\n"


def _local_names(card: str) -> str:
    """A card's front matter with every `base_model:` entry that is a local path replaced by its name."""
    m = re.match(r"(?s)---\n(.*?)\n---\n", card)
    if not m:
        return card
    try:
        meta = yaml.safe_load(m.group(1))
    except yaml.YAMLError:
        return card
    bm = meta.get("base_model") if isinstance(meta, dict) else None
    if bm is None:
        return card
    items = bm if isinstance(bm, list) else [bm]
    fixed = [model_name(b) if isinstance(b, str) and (b.startswith(("/", "~", ".")) or "\\" in b) else b for b in items]
    if fixed == items:
        return card
    meta["base_model"] = fixed if isinstance(bm, list) else fixed[0]
    return "\n".join(_front(meta)) + card[m.end():].lstrip("\n")


def conversion_card(plan: Plan, conversions: list[dict], prior_card: str | None) -> str:
    lin = plan.recipe.lineage or {}
    if prior_card:
        body = _strip_section(_local_names(prior_card), "Conversions")
        return body + "\n" + "\n".join(conversions_section(conversions))
    source = lin.get("source")
    fp8 = plan.recipe.dtype == "float8"
    meta = {"base_model": [source], **({"base_model_relation": "quantized"} if fp8 else {}),
            "library_name": "transformers", "tags": ["chimera", "moe", plan.arch] + (["fp8"] if fp8 else [])}
    return "\n".join([
        *_front(meta),
        f"# {source} ({DTYPE_WORDS.get(plan.recipe.dtype, plan.recipe.dtype)})", "",
        f"`{source}` (architecture `{plan.arch}`) converted by chimera: {HOW.get(plan.recipe.dtype, '')}.", "",
        *conversions_section(conversions),
    ])


def record(plan: Plan, records: dict[str, dict], ops: dict[str, int], summary: dict | None = None) -> dict:
    """The content of `chimera_merge.json` (`summary`: extra figures such as bytes copied/computed)."""
    own = {"plan_id": plan.plan_id, "recipe": plan.recipe.to_dict(), "metric": plan.metric,
           "config_from_base": plan.resolved,
           "summary": {"tensors": len(records), "ops": ops, **(summary or {})}, "tensors": records}
    lin = plan.recipe.lineage
    if lin is None:
        return own
    prior = lin.get("record")
    if isinstance(prior, dict):
        return {**prior, "conversions": [*(prior.get("conversions") or []), conversion_entry(plan, ops)]}
    own.pop("recipe")
    return {"plan_id": plan.plan_id, "source": lin.get("source"), **own, "conversions": [conversion_entry(plan, ops)]}


def write(plan: Plan, out: Path, ops: dict[str, int], distances: bool = True) -> None:
    """README.md and chimera_recipe.yaml; `ops`: how many tensors each operation produced; `distances`:
    every record holds one."""
    r = plan.recipe
    if r.lineage is None:
        (out / "README.md").write_text(merge_card(plan, ops, distances))
        text = r.source or yaml.safe_dump(r.to_dict(), sort_keys=False)
        (out / "chimera_recipe.yaml").write_text(text if text.endswith("\n") else text + "\n")
        return
    prior = r.lineage.get("record")
    conversions = [*((prior or {}).get("conversions") or []), conversion_entry(plan, ops)]
    (out / "README.md").write_text(conversion_card(plan, conversions, r.lineage.get("card")))
    if r.lineage.get("recipe"):
        (out / "chimera_recipe.yaml").write_text(r.lineage["recipe"])
