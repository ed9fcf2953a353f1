"""The output model card (README.md with Hub metadata) and a copy of the recipe."""
from __future__ import annotations

from pathlib import Path

import yaml

from chimera.merge.plan import Plan


def write(plan: Plan, out: Path, ops: dict[str, int], distances: bool = True) -> None:
    """`ops`: how many tensors each operation produced; `distances`: every record holds one."""
    r = plan.recipe
    meta = {"base_model": [str(p) for p in r.parents.values()], "base_model_relation": "merge",
            "library_name": "transformers",
            "tags": ["chimera", "merge", "assembly-of-experts", "moe", plan.arch]}
    recipe_text = r.source or yaml.safe_dump(r.to_dict(), sort_keys=False)
    lines = [
        "---", yaml.safe_dump(meta, sort_keys=False).strip(), "---", "",
        f"# Assembly-of-Experts merge of {', '.join(r.parents)}", "",
        f"Built by chimera from {len(r.parents)} parents of architecture `{plan.arch}`; config, tokenizer "
        f"and every unmerged tensor come from the base parent `{r.base}`.", "",
        "Every tensor W_t is `sum_i lambda_i W_t(parent_i)` with lambdas per tensor class "
        "(a single lambda of 1 copies the parent's stored bytes verbatim).", "",
        "| operation | tensors |", "| --- | --- |",
        *[f"| {op} | {n} |" for op, n in sorted(ops.items())], "",
        *([f"The parents differ in `{'`, `'.join(plan.resolved)}`; the child has the base's values "
           "(`use_base_config`), and tensors stored in another quantization format were converted to "
           "the child's.", ""] if plan.resolved else []),
        "## Recipe", "", "```yaml", recipe_text.strip(), "```", "",
        (f"Per-tensor operations and {plan.metric} distances of the parents to the base: `chimera_merge.json`."
         if distances else "Per-tensor operations: `chimera_merge.json` (distances were not measured)."), "",
    ]
    (out / "README.md").write_text("\n".join(lines))
    (out / "chimera_recipe.yaml").write_text(recipe_text if recipe_text.endswith("\n") else recipe_text + "\n")
