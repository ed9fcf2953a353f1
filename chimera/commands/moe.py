"""`chimera route`, `chimera ftri`, `chimera tune`: thin commands over chimera.moe."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from chimera.errors import ChimeraError


def _console():
    from rich.console import Console

    return Console()


def resolve_model_path(model: str) -> Path:
    """A checkpoint directory, or a bundled model name (chimera.zoo)."""
    p = Path(model)
    if p.is_dir():
        return p
    try:
        from chimera.zoo.family import model_path  # type: ignore

        q = Path(model_path(model))
        if q.is_dir():
            return q
    except (ImportError, KeyError, ValueError, ChimeraError):
        pass
    raise ChimeraError(f"{model}: no such checkpoint directory or bundled model")


def load_model(model: str):
    """(model, tokenizer) via the eval harness when present, else transformers directly (CPU, eval mode)."""
    path = resolve_model_path(model)
    try:
        from chimera.eval.harness import load  # type: ignore
    except ImportError:
        load = None
    if load is not None:
        return load(path)
    import transformers as tf

    try:
        m = tf.AutoModelForCausalLM.from_pretrained(path).eval()
        tok = tf.AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise ChimeraError(f"{path}: can't load model ({str(e).splitlines()[0]})") from None
    return m, tok


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
    from chimera.moe.capture import route_texts
    from chimera.moe.ftri import generate_responses, load_prompts
    from chimera.moe.switch import switched

    texts = load_prompts(prompts)
    m, tok = load_model(model)
    with switched(m, off=off, on=on, mode=mode) if (off or on) else _null():
        resp = generate_responses(m, tok, texts, max_new_tokens, batch_size) if responses else None
        routes = route_texts(m, tok, texts, resp, batch_size=batch_size)
    routes.save(out)
    c = _console()
    c.print(f"routed {routes.n_prompts} prompts over {len(routes.layers)} MoE layers x {routes.num_experts} experts "
            f"({int(routes.tokens['prompt'].sum())} prompt tokens"
            + (f", {int(routes.tokens['response'].sum())} response tokens" if "response" in routes.tokens else "")
            + f") -> {out}")


class _null:
    def __enter__(self):
        return None

    def __exit__(self, *a):
        return False


def _ftri(model: str = typer.Argument(..., help="checkpoint directory or bundled model name"),
          target: Optional[Path] = typer.Option(None, "--target", help="JSONL prompts of the target behaviour "
                                                                      "(with --label-by-response: the one prompt set)"),
          contrast: Optional[Path] = typer.Option(None, "--contrast", help="JSONL contrast prompts"),
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
    from chimera.moe.capture import route_texts

    if top < 1:
        raise ChimeraError("--top must be at least 1")
    if target is None:
        raise ChimeraError("--target is required")
    if label_by_response is None and contrast is None:
        raise ChimeraError("give --contrast prompts, or --label-by-response SCORER to split --target by its responses")
    kind = tokens or ("response" if label_by_response else "prompt")
    if kind not in ("prompt", "response"):
        raise ChimeraError(f"--tokens must be prompt or response, not {kind!r}")
    t_prompts = F.load_prompts(target)
    c_prompts = F.load_prompts(contrast) if contrast is not None and label_by_response is None else None
    scorer = F.resolve_scorer(label_by_response) if label_by_response else None
    if endpoint:
        from chimera.moe.engine_routes import ftri_endpoint

        result = ftri_endpoint(endpoint, model, t_prompts, c_prompts, scorer, target_label, kind, stat, max_new_tokens,
                               api_key, num_experts, top_k, label_by_response)
        _finish(result, top, out, csv, plot)
        return
    m, tok = load_model(model)
    meta = {"model": str(model)}
    if scorer is not None:
        resp = F.generate_responses(m, tok, t_prompts, max_new_tokens, batch_size)
        labels = F.label_responses(scorer, t_prompts, resp)
        goal = _target_label(labels, target_label)
        routes = route_texts(m, tok, t_prompts, resp, batch_size=batch_size)
        result = F.ftri_labelled(routes, labels, goal, stat=stat, tokens=kind,
                                 meta={**meta, "scorer": label_by_response})
    else:
        need = kind == "response"
        rt = route_texts(m, tok, t_prompts, F.generate_responses(m, tok, t_prompts, max_new_tokens, batch_size)
                         if need else None, batch_size=batch_size)
        rc = route_texts(m, tok, c_prompts, F.generate_responses(m, tok, c_prompts, max_new_tokens, batch_size)
                         if need else None, batch_size=batch_size)
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
    from rich.table import Table

    t = Table(title=f"fTRI top {top} ({result.tokens} tokens, {result.stat}; "
                    f"{result.n_target} target vs {result.n_contrast} contrast)")
    for col in ("rank", "layer:expert", "diff", "target", "contrast"):
        t.add_column(col, justify="right")
    row = {L: j for j, L in enumerate(result.layers)}
    for i, (L, e, d) in enumerate(result.ranking()[:top]):
        t.add_row(str(i + 1), f"{L}:{e}", f"{d:+.4f}", f"{result.target_mean[row[L], e]:.4f}",
                  f"{result.contrast_mean[row[L], e]:.4f}")
    c = _console()
    c.print(t)
    c.print(f"-> {out}")


def _tune(model: str = typer.Argument(..., help="DeepSeek-V3-architecture checkpoint directory or bundled model"),
          off: str = typer.Option(..., "--off", help="experts to switch off: L:E,... or @ftri.json:K"),
          on: str = typer.Option("", "--on", help="experts to force on (bias +1e4)"),
          output: Path = typer.Option(..., "-o", "--output", help="output checkpoint directory (must not exist)")) -> None:
    """Persist a replace-off switch: a normal checkpoint with those experts' router bias set to -1e4."""
    from chimera.moe.switch import tune_checkpoint

    rec = tune_checkpoint(resolve_model_path(model), output, off=off, on=on)
    _console().print(f"switched off {rec['n_off']} experts" + (f", forced on {rec['n_on']}" if rec["n_on"] else "")
                     + f" via e_score_correction_bias in {len(rec['tensors'])} router(s) -> {output}")


def register(app: typer.Typer) -> None:
    app.command("route")(_route)
    app.command("ftri")(_ftri)
    app.command("tune")(_tune)
