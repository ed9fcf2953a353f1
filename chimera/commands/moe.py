"""`chimera route`, `chimera ftri`, `chimera tune`: thin commands over chimera.moe.

Every argument that needs no model (expert lists, @ftri.json files, modes, prompt files, scorers, output
paths) is checked before the model loads.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from chimera.commands import ui
from chimera.errors import ChimeraError

FEW = 10  # fTRI warns when a class has fewer prompts than this: its mean routing is mostly noise


def load_model(model: str):
    """(model, tokenizer) through the eval harness, with a spinner while it loads."""
    from chimera.eval.harness import load

    with ui.status(f"loading {model}"):
        return load(model)


def _route(model: str = typer.Argument(..., help="checkpoint directory or bundled model name"),
           prompts: Path = typer.Option(..., "--prompts", help="JSONL prompts"),
           out: Path = typer.Option(..., "--out", help="output .npz"),
           responses: bool = typer.Option(False, "--responses", help="also generate responses and record "
                                                                      "response-token statistics"),
           max_new_tokens: int = typer.Option(64, "--max-new-tokens"),
           batch_size: int = typer.Option(8, "--batch-size"),
           off: str = typer.Option("", "--off", help="route with these experts switched off (L:E,... or @ftri.json:K)"),
           on: str = typer.Option("", "--on", help="route with these experts forced on"),
           mode: str = typer.Option("replace", "--mode", help="replace|drop")) -> None:
    """Record per (layer, expert) routing statistics (selection counts, summed weights) for every prompt."""
    from chimera.moe.ftri import load_prompts

    ui.positive(batch_size, "--batch-size")
    ui.positive(max_new_tokens, "--max-new-tokens")
    texts = load_prompts(prompts)
    ui.output_file(out, "--out")
    off_l, on_l = ui.experts(off, on, mode, model)
    m, tok = load_model(model)
    from chimera.moe.capture import route_texts
    from chimera.moe.ftri import generate_responses
    from chimera.moe.switch import switched

    with switched(m, off=off_l, on=on_l, mode=mode), ui.progress() as bar:
        resp = None
        if responses:
            t = bar.add_task("generate", total=len(texts))
            resp = generate_responses(m, tok, texts, max_new_tokens, batch_size, on_batch=lambda k: bar.advance(t, k))
        t = bar.add_task("route", total=len(texts))
        routes = route_texts(m, tok, texts, resp, batch_size=batch_size, on_batch=lambda k: bar.advance(t, k))
    out.parent.mkdir(parents=True, exist_ok=True)
    routes.save(out)
    ui.out().print(f"routed {routes.n_prompts} prompts over {len(routes.layers)} MoE layers x {routes.num_experts} "
                   f"experts ({int(routes.tokens['prompt'].sum())} prompt tokens"
                   + (f", {int(routes.tokens['response'].sum())} response tokens" if "response" in routes.tokens else "")
                   + f") -> {out}")


def _ftri(model: str = typer.Argument(..., help="checkpoint directory or bundled model name"),
          target: Optional[Path] = typer.Option(None, "--target", help="JSONL prompts of the target behaviour "
                                                                      "(with --label-by-response: the one prompt set)"),
          contrast: Optional[Path] = typer.Option(None, "--contrast", help="JSONL contrast prompts (not with "
                                                                          "--label-by-response)"),
          label_by_response: Optional[str] = typer.Option(None, "--label-by-response",
                                                          help="generate responses to --target and label them with "
                                                               "this scorer (chimera.eval.scorers)"),
          target_label: Optional[str] = typer.Option(None, "--target-label",
                                                     help="label of the target class (default: true / the scorer's "
                                                          "positive label)"),
          tokens: Optional[str] = typer.Option(None, "--tokens", help="prompt|response tokens (default: prompt for "
                                                                      "two sets, response with --label-by-response)"),
          stat: str = typer.Option("count", "--stat", help="count (token share) | weight (mean routing weight)"),
          top: int = typer.Option(10, "--top"),
          out: Path = typer.Option(..., "--out", help="output JSON"),
          csv: Optional[Path] = typer.Option(None, "--csv", help="also write the full ranking as CSV"),
          plot: Optional[Path] = typer.Option(None, "--plot", help="heatmap PNG with the top experts marked"),
          max_new_tokens: int = typer.Option(64, "--max-new-tokens"),
          batch_size: int = typer.Option(8, "--batch-size"),
          endpoint: Optional[str] = typer.Option(None, "--endpoint", help="fTRI from the routed experts a server "
                                                 "returns (chimera serve, vLLM, SGLang); MODEL is the served name"),
          api_key: Optional[str] = typer.Option(None, "--api-key", envvar="CHIMERA_API_KEY"),
          num_experts: Optional[int] = typer.Option(None, "--num-experts", help="with --endpoint: routed experts "
                                                    "per layer (chimera serve publishes it)"),
          top_k: Optional[int] = typer.Option(None, "--top-k", help="with --endpoint: experts per token (needed to "
                                              "reshape SGLang's flat payload)")) -> None:
    """fTRI: rank routed experts by mean(target) - mean(contrast) routing over the whole model."""
    from chimera.moe import ftri as F

    ui.positive(top, "--top")
    ui.positive(batch_size, "--batch-size")
    ui.positive(max_new_tokens, "--max-new-tokens")
    if target is None:
        raise ChimeraError("--target is required")
    if label_by_response is not None and contrast is not None:
        raise ChimeraError("--contrast is not used with --label-by-response (the scorer splits the --target "
                           "prompts by their responses): give one of them")
    if label_by_response is None and contrast is None:
        raise ChimeraError("give --contrast prompts, or --label-by-response SCORER to split --target by its responses")
    if target_label is not None and label_by_response is None:
        raise ChimeraError("--target-label names a scorer's label: it needs --label-by-response")
    kind = ui.one_of(tokens or ("response" if label_by_response else "prompt"), ("prompt", "response"), "--tokens")
    ui.one_of(stat, ("count", "weight"), "--stat")
    t_prompts = F.load_prompts(target)
    c_prompts = F.load_prompts(contrast) if contrast is not None else None
    scorer = F.resolve_scorer(label_by_response) if label_by_response else None
    for path, flag in ((out, "--out"), (csv, "--csv"), (plot, "--plot")):
        ui.output_file(path, flag)
    if c_prompts is not None:
        for name, ps in (("target", t_prompts), ("contrast", c_prompts)):
            if len(ps) < FEW:
                ui.warn(f"fTRI: only {len(ps)} {name} prompt(s); with fewer than {FEW} per class the ranking is "
                        "mostly noise")
    if endpoint:
        from chimera.moe.engine_routes import ftri_endpoint

        result = ftri_endpoint(endpoint, model, t_prompts, c_prompts, scorer, target_label, kind, stat, max_new_tokens,
                               api_key, num_experts, top_k, label_by_response)
        _finish(result, top, out, csv, plot)
        return
    m, tok = load_model(model)
    from chimera.moe.capture import route_texts

    meta = {"model": str(model)}

    def run(prompts, label, need_responses, bar):
        resp = None
        if need_responses:
            t = bar.add_task(f"generate {label}", total=len(prompts))
            resp = F.generate_responses(m, tok, prompts, max_new_tokens, batch_size,
                                        on_batch=lambda k: bar.advance(t, k))
        t = bar.add_task(f"route {label}", total=len(prompts))
        return resp, route_texts(m, tok, prompts, resp, batch_size=batch_size, on_batch=lambda k: bar.advance(t, k))

    with ui.progress() as bar:
        if scorer is not None:
            resp, routes = run(t_prompts, "target", True, bar)
            labels = F.label_responses(scorer, t_prompts, resp)
            goal = _target_label(labels, target_label)
            n_goal = sum(1 for lab in labels if lab == goal)
            for name, k in (("target", n_goal), ("contrast", len(labels) - n_goal)):
                if 0 < k < FEW:
                    ui.warn(f"fTRI: only {k} response(s) in the {name} class (labels: "
                            f"{ {str(x): labels.count(x) for x in dict.fromkeys(labels)} }); with fewer than {FEW} "
                            "the ranking is mostly noise")
            result = F.ftri_labelled(routes, labels, goal, stat=stat, tokens=kind,
                                     meta={**meta, "scorer": label_by_response})
        else:
            need = kind == "response"
            rt = run(t_prompts, "target", need, bar)[1]
            rc = run(c_prompts, "contrast", need, bar)[1]
            result = F.ftri_routes(rt, rc, stat=stat, tokens=kind, meta=meta)
    _finish(result, top, out, csv, plot)


def _finish(result, top, out, csv, plot):
    result.write_json(out, top=top)
    if csv is not None:
        result.write_csv(csv)
    if plot is not None:
        result.plot(plot, top=top)
    _print_top(result, top, out)


def _target_label(labels, wanted):
    from chimera.moe.ftri import pick_target_label

    return pick_target_label(labels, wanted)


def _print_top(result, top, out):
    t = ui.table(f"fTRI top {top} ({result.tokens} tokens, {result.stat}; "
                 f"{result.n_target} target vs {result.n_contrast} contrast)",
                 ["rank", "layer:expert", "diff", "target", "contrast"],
                 right=("rank", "layer:expert", "diff", "target", "contrast"))
    row = {L: j for j, L in enumerate(result.layers)}
    for i, (L, e, d) in enumerate(result.ranking()[:top]):
        t.add_row(str(i + 1), f"{L}:{e}", f"{d:+.4f}", f"{result.target_mean[row[L], e]:.4f}",
                  f"{result.contrast_mean[row[L], e]:.4f}")
    ui.out().print(t)
    ui.out().print(f"-> {out}")


def _tune(model: str = typer.Argument(..., help="DeepSeek-V3-architecture checkpoint directory or bundled model"),
          off: str = typer.Option(..., "--off", help="experts to switch off: L:E,... or @ftri.json:K"),
          on: str = typer.Option("", "--on", help="experts to force on (bias +1e4)"),
          output: Path = typer.Option(..., "-o", "--output", help="output checkpoint directory (must not exist)")) -> None:
    """Persist a replace-off switch: a normal checkpoint with those experts' router bias set to -1e4."""
    from chimera.moe.switch import tune_checkpoint
    from chimera.resolve import resolve_model

    off_l, on_l = ui.experts(off, on, "replace")
    ui.output_dir(output, "-o")
    rec = tune_checkpoint(resolve_model(model), output, off=off_l, on=on_l)
    ui.out().print(f"switched off {rec['n_off']} experts" + (f", forced on {rec['n_on']}" if rec["n_on"] else "")
                   + f" via e_score_correction_bias in {len(rec['tensors'])} router(s) -> {output}")


def register(app: typer.Typer) -> None:
    app.command("route")(_route)
    app.command("ftri")(_ftri)
    app.command("tune")(_tune)
