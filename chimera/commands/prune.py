"""`chimera prune`: remove routed experts from a checkpoint (thin command over chimera.moe.prune)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from chimera.errors import ChimeraError

BY = ("reap", "frequency", "random", "ftri@FILE")


def _prune(model: str = typer.Argument(..., help="checkpoint directory or bundled model name"),
           output: Path = typer.Option(..., "-o", "--output", help="output checkpoint directory (must not exist)"),
           drop: Optional[str] = typer.Option(None, "--drop", help="experts to remove: L:E,... or @ftri.json:K"),
           keep_per_layer: Optional[int] = typer.Option(None, "--keep-per-layer", help="experts to keep per MoE layer"),
           by: Optional[str] = typer.Option(None, "--by", help="with --keep-per-layer: reap | frequency | random | "
                                                               "ftri@FILE (drops the experts most tied to the target)"),
           prompts: Optional[Path] = typer.Option(None, "--prompts", help="JSONL calibration prompts (reap, frequency)"),
           max_new_tokens: int = typer.Option(64, "--max-new-tokens", help="calibration responses generated per "
                                                                            "prompt (0: prompts only)"),
           batch_size: int = typer.Option(8, "--batch-size"),
           seed: int = typer.Option(0, "--seed", help="for --by random"),
           drop_mtp: bool = typer.Option(False, "--drop-mtp", help="remove DeepSeek's MTP layer (no statistics for it)")
           ) -> None:
    """Remove routed experts: their tensors (renumbered), router rows and bias entries, the config's count."""
    from chimera.checkpoint.files import Checkpoint
    from chimera.commands import ui
    from chimera.commands.moe import load_model
    from chimera.moe import prune as P
    from chimera.resolve import resolve_model

    src = resolve_model(model)
    if (drop is None) == (keep_per_layer is None):
        raise ChimeraError("give either --drop SPEC or --keep-per-layer N --by METHOD")
    ui.positive(keep_per_layer, "--keep-per-layer")
    ui.positive(batch_size, "--batch-size")
    ui.output_dir(output, "-o")
    layout = P.read_layout(Checkpoint(src))
    record: dict = {}
    if drop is not None:
        from chimera.moe.switch import parse_experts

        keep = P.keep_from_drop(parse_experts(drop), layout)
        record["method"] = {"drop": drop}
    else:
        if by is None:
            raise ChimeraError(f"--keep-per-layer needs --by ({' | '.join(BY)})")
        if by.startswith("ftri@"):
            scores = P.scores_from_ftri(by[len("ftri@"):], layout)
        elif by == "random":
            scores = P.random_scores(layout, seed)
        elif by in ("reap", "frequency"):
            if prompts is None:
                raise ChimeraError(f"--by {by} needs --prompts FILE (calibration prompts, JSONL)")
            from chimera.moe.ftri import load_prompts

            texts = load_prompts(prompts)
            m, tok = load_model(str(src))
            scores = P.scores_from_routes(P.capture_routes(m, tok, texts, max_new_tokens, batch_size), by)
        else:
            raise ChimeraError(f"unknown --by {by!r} (one of {', '.join(BY)})")
        keep = P.select_keep(scores, keep_per_layer, layout.n_group)
        record["method"] = {"keep_per_layer": keep_per_layer, "by": by, "seed": seed if by == "random" else None,
                            "prompts": str(prompts) if prompts else None}
        record["scores"] = {str(L): [round(float(x), 8) for x in s] for L, s in scores.items()}
    s = P.prune_checkpoint(src, output, keep, drop_mtp=drop_mtp, record=record)
    typer.echo(f"pruned {s['n_experts_before']} -> {s['n_experts_after']} routed experts per layer in "
               f"{len(s['kept'])} MoE layer(s) -> {output}")
    for note in s["notes"]:
        typer.echo(f"note: {note}")


def register(app: typer.Typer) -> None:
    app.command("prune")(_prune)
