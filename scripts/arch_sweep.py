"""How far the derived architecture knowledge reaches: every MoE model type of the installed transformers.

For each config class with an expert count, build its causal-LM (or image-text) model from the default config
on the meta device, write its on-disk names with transformers' own reverse conversions (what save_pretrained
would write), and classify every name with `chimera.checkpoint.arch`. Reports which types classify fully, which
routers have an adapter (live switches, tune), and which types transformers cannot build from a default config.

    python scripts/arch_sweep.py [--out benchmarks/results/arch_sweep.json]
"""
from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path

EXPERT_KEYS = ("n_routed_experts", "num_experts", "num_local_experts", "moe_num_experts")


def _is_moe(config) -> bool:
    try:
        text = config.get_text_config()
    except Exception:  # noqa: BLE001 - ambiguous text configs (encoder-decoders)
        text = config
    for k in EXPERT_KEYS:
        try:
            if getattr(text, k, None):
                return True
        except Exception:  # noqa: BLE001 - per-layer attributes refuse global access: still MoE
            return True
    return False


def sweep() -> dict:
    import torch
    import transformers
    from transformers.core_model_loading import revert_weight_conversion
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING
    from transformers.utils import logging as hf_logging

    from chimera.checkpoint import arch
    from chimera.errors import ChimeraError
    from chimera.moe.routers import ADAPTERS

    hf_logging.set_verbosity_error()
    rows = {}
    for mt in sorted(CONFIG_MAPPING.keys()):
        try:
            cfg = CONFIG_MAPPING[mt]()
        except Exception:  # noqa: BLE001 - configs that need arguments
            continue
        if not _is_moe(cfg):
            continue
        t = time.perf_counter()
        d = cfg.to_dict()
        d["model_type"] = mt
        try:
            a = arch.of(d)
        except ChimeraError as e:
            rows[mt] = {"status": "not built", "why": str(e)[:160]}
            continue
        if not a.moe:
            rows[mt] = {"status": "no MoE block found", "class": a.model_class}
            continue
        try:
            with torch.device("meta"):
                names = list(revert_weight_conversion(a.model, a.model.state_dict()))
        except Exception:  # noqa: BLE001 - a reverse conversion that can't run on meta: in-memory names
            names = list(a.model.state_dict())
        unknown = [n for n in names if arch.classify(n, d) is None]
        routers = sorted({b.router_class for b in a.moe.values()})
        rows[mt] = {"status": "classified" if not unknown else "unclassified names", "class": a.model_class,
                    "tensors": len(names), "unknown": unknown[:5], "routers": routers,
                    "adapter": all(r in ADAPTERS for r in routers), "seconds": round(time.perf_counter() - t, 2)}
        arch._cached.cache_clear()
    counts: dict[str, int] = {}
    for r in rows.values():
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    return {"transformers": transformers.__version__, "counts": counts,
            "with_adapter": sorted(mt for mt, r in rows.items() if r.get("adapter")), "types": rows}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="benchmarks/results/arch_sweep.json")
    args = p.parse_args()
    warnings.filterwarnings("ignore")
    res = sweep()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=2) + "\n")
    print(json.dumps(res["counts"]), f"-> {args.out}")


if __name__ == "__main__":
    main()
