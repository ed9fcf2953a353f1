"""Routed experts as serving engines return them, decoded into per-prompt routing statistics (`Routes`).

Formats (one generation = `P` prompt tokens + `G` generated tokens; the last generated token is never
forwarded, so `N = P + G - 1` rows; row `i` is the routing of the token at position `i`):

- `vllm` (also `chimera serve`): `choices[i].routed_experts` = base64 of a `.npy` file holding an integer
  array [N, num_hidden_layers, top_k]. vLLM fills decoder layers without a router with 0, chimera with -1.
- `sglang`: `sglext.routed_experts` (response level; older releases: `meta_info.routed_experts`) = base64 of
  the raw little-endian int32 bytes of the same [N, num_hidden_layers, top_k] array, flattened; the reader
  needs `top_k` (or the layer count) to reshape it.

A decoder layer counts as an MoE layer when its rows look like routing: ids >= 0 and, for top_k >= 2, the k ids
of a row distinct (a real router never picks one expert twice; a filler row of 0s or -1s repeats one value).
"""
from __future__ import annotations

import base64
import binascii
import io
from dataclasses import dataclass

import numpy as np

from chimera.errors import ChimeraError
from chimera.moe.capture import Routes

FORMATS = ("vllm", "sglang")


def encode_npy(arr: np.ndarray) -> str:
    """vLLM's payload: base64 of the `.npy` serialization of `arr`."""
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(arr), allow_pickle=False)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def encode_sglang(arr: np.ndarray) -> str:
    """SGLang's payload: base64 of the raw int32 bytes of `arr` (flattened, row-major)."""
    return base64.b64encode(np.ascontiguousarray(arr, dtype="<i4").tobytes()).decode("ascii")


def _b64(s, what: str) -> bytes:
    if not isinstance(s, str):
        raise ChimeraError(f"{what}: expected a base64 string, got {type(s).__name__}")
    try:
        return base64.b64decode(s.encode("ascii"), validate=True)
    except (binascii.Error, ValueError, UnicodeEncodeError):
        raise ChimeraError(f"{what}: not valid base64") from None


def decode_npy(s: str, what: str = "routed_experts") -> np.ndarray:
    try:
        arr = np.load(io.BytesIO(_b64(s, what)), allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise ChimeraError(f"{what}: not a .npy payload ({e.__class__.__name__})") from None
    if arr.ndim != 3 or arr.dtype.kind not in "iu":
        raise ChimeraError(f"{what}: expected an integer array [tokens, layers, top_k], got {arr.dtype} {arr.shape}")
    return arr.astype(np.int64)


def decode_sglang(s: str, top_k: int | None, n_rows: int | None = None, n_layers: int | None = None,
                  what: str = "routed_experts") -> np.ndarray:
    raw = _b64(s, what)
    if len(raw) % 4:
        raise ChimeraError(f"{what}: {len(raw)} bytes is not a whole number of int32 values")
    flat = np.frombuffer(raw, dtype="<i4").astype(np.int64)
    if n_layers is None:
        if not top_k or n_rows is None:
            raise ChimeraError(f"{what}: an SGLang payload is a flat int32 list; give --top-k (and the server's "
                               f"usage counts) to reshape it")
        if flat.size % (n_rows * top_k):
            raise ChimeraError(f"{what}: {flat.size} ids don't fit {n_rows} tokens x top_k={top_k}")
        n_layers = flat.size // (n_rows * top_k)
    if top_k is None:
        if n_rows is None or flat.size % (n_rows * n_layers):
            raise ChimeraError(f"{what}: can't reshape {flat.size} ids without top_k")
        top_k = flat.size // (n_rows * n_layers)
    if flat.size % (n_layers * top_k):
        raise ChimeraError(f"{what}: {flat.size} ids don't fit layers={n_layers} x top_k={top_k}")
    return flat.reshape(-1, n_layers, top_k)


@dataclass
class Generation:
    """One response's routing: `experts` [N, n_layers, top_k] and how many rows are prompt tokens."""

    experts: np.ndarray
    prompt_tokens: int
    text: str = ""


def parse_response(body: dict, top_k: int | None = None, n_layers: int | None = None) -> Generation:
    """The routed experts (and text) of one OpenAI-style response body of vLLM, SGLang or chimera serve."""
    if not isinstance(body, dict):
        raise ChimeraError("response: not a JSON object")
    choices = body.get("choices") or [{}]
    choice = choices[0] if isinstance(choices[0], dict) else {}
    msg = choice.get("message") or {}
    text = msg.get("content") or choice.get("text") or ""
    if msg.get("reasoning_content") and "<think>" not in text:
        text = f"<think>{msg['reasoning_content']}</think>{text}"
    usage = body.get("usage") or {}
    p, g = usage.get("prompt_tokens"), usage.get("completion_tokens")
    n_rows = p + g - 1 if isinstance(p, int) and isinstance(g, int) else None
    if choice.get("routed_experts") is not None:
        arr = decode_npy(choice["routed_experts"])
    else:
        ext = body.get("sglext") or choice.get("sglext") or body.get("meta_info") or {}
        payload = ext.get("routed_experts") if isinstance(ext, dict) else None
        if payload is None:
            raise ChimeraError("response has no routed experts (vLLM: start it with --enable-return-routed-experts; "
                               "SGLang: --enable-return-routed-experts and the request's return_routed_experts)")
        arr = decode_sglang(payload, top_k, n_rows, n_layers)
    if p is None:
        raise ChimeraError("response has no usage.prompt_tokens: can't split prompt and response tokens")
    if n_rows is not None and arr.shape[0] != n_rows:
        raise ChimeraError(f"routed_experts has {arr.shape[0]} rows but usage says {p} prompt + {g} completion "
                           f"tokens ({n_rows} forwarded)")
    return Generation(arr, int(p), text)


def moe_layer_mask(experts: np.ndarray) -> np.ndarray:
    """[n_layers] bool: which decoder layers carry routing (see the module docstring)."""
    valid = (experts >= 0).all(axis=(0, 2))
    if experts.shape[2] < 2 or experts.shape[0] == 0:
        return valid
    s = np.sort(experts, axis=2)
    distinct = (np.diff(s, axis=2) != 0).all(axis=2)             # [N, L]
    return valid & distinct.all(axis=0)


def to_routes(gens: list[Generation], num_experts: int | None = None, texts: list[str] | None = None) -> Routes:
    """Per-prompt selection counts over prompt tokens and response tokens, like `capture.record_routes`
    (no routing weights: engines return indices only, so the `weight` statistic is not available)."""
    if not gens:
        raise ChimeraError("no responses to aggregate")
    shapes = {g.experts.shape[1:] for g in gens}
    if len(shapes) != 1:
        raise ChimeraError(f"responses disagree on [layers, top_k]: {sorted(shapes)}")
    moe = np.ones(gens[0].experts.shape[1], dtype=bool)
    for g in gens:
        moe &= moe_layer_mask(g.experts)
    layers = [int(i) for i in np.nonzero(moe)[0]]
    if not layers:
        raise ChimeraError("no decoder layer carries routing in these responses")
    top = max(int(g.experts[:, layers].max()) for g in gens if g.experts.size)
    E = int(num_experts) if num_experts else top + 1
    if top >= E:
        raise ChimeraError(f"expert id {top} out of range for --num-experts {E}")
    P = len(gens)
    r = Routes(layers=layers, num_experts=E, texts=list(texts or []))
    for kind in ("prompt", "response"):
        counts = np.zeros((P, len(layers), E), dtype=np.float32)
        ntok = np.zeros(P, dtype=np.int64)
        for i, g in enumerate(gens):
            rows = g.experts[: g.prompt_tokens] if kind == "prompt" else g.experts[g.prompt_tokens:]
            ntok[i] = rows.shape[0]
            for j, L in enumerate(layers):
                counts[i, j] = np.bincount(rows[:, L].reshape(-1), minlength=E)
        r.counts[kind] = counts
        r.weights[kind] = np.full_like(counts, np.nan)
        r.tokens[kind] = ntok
    return r


def served_layout(url: str, api_key: str | None = None) -> dict | None:
    """The MoE layout a `chimera serve` publishes in /v1/models (`moe`: layers, num_experts, top_k), or None
    for servers that don't (vLLM, SGLang)."""
    import httpx

    base = url.split("/v1")[0].rstrip("/")
    try:
        r = httpx.get(base + "/v1/models", headers={"Authorization": f"Bearer {api_key}"} if api_key else {},
                      timeout=30)
        data = r.json().get("data") or [{}]
        return data[0].get("moe") if r.status_code == 200 and isinstance(data[0], dict) else None
    except (httpx.HTTPError, ValueError, AttributeError):
        return None


def collect(endpoint, prompts: list[str], max_new_tokens: int = 64, top_k: int | None = None) -> list[Generation]:
    """Ask `endpoint` (a `chimera.eval.endpoint.Endpoint`) for each prompt with `return_routed_experts` and
    decode every answer's routing."""
    from concurrent.futures import ThreadPoolExecutor

    endpoint.extra.setdefault("return_routed_experts", True)
    with ThreadPoolExecutor(endpoint.workers) as pool:
        bodies = list(pool.map(lambda p: endpoint.request(p, max_new_tokens), prompts))
    out = []
    for i, b in enumerate(bodies):
        try:
            out.append(parse_response(b, top_k))
        except ChimeraError as e:
            raise ChimeraError(f"endpoint {endpoint.url}, prompt {i + 1}: {e}") from None
    return out


def ftri_endpoint(url: str, model: str, target: list[str], contrast: list[str] | None, scorer, target_label,
                  tokens: str, stat: str, max_new_tokens: int, api_key: str | None, num_experts: int | None,
                  top_k: int | None, scorer_name: str | None = None):
    """fTRI (like `chimera ftri`) from a server's routed experts: two prompt sets, or one set split by a scorer
    on the server's own answers. Only the `count` statistic exists (engines return indices, not weights)."""
    from chimera.eval.endpoint import Endpoint
    from chimera.moe import ftri as F

    if stat != "count":
        raise ChimeraError("--stat weight needs routing weights, which servers don't return: use --stat count")
    layout = served_layout(url, api_key) or {}
    num_experts = num_experts or layout.get("num_experts")
    top_k = top_k or layout.get("top_k")
    ep = Endpoint(url, model=model or None, api_key=api_key)
    meta = {"model": model, "endpoint": url}
    try:
        gt = collect(ep, target, max_new_tokens, top_k)
        rt = to_routes(gt, num_experts, target)
        if scorer is not None:
            labels = F.label_responses(scorer, target, [g.text for g in gt])
            goal = F.pick_target_label(labels, target_label)
            return F.ftri_labelled(rt, labels, goal, stat=stat, tokens=tokens, meta={**meta, "scorer": scorer_name})
        gc = collect(ep, contrast or [], max_new_tokens, top_k)
        rc = to_routes(gc, num_experts or rt.num_experts, contrast)
        if rc.layers != rt.layers:
            raise ChimeraError(f"target and contrast answers route through different layers ({rt.layers} vs {rc.layers})")
        if rc.num_experts != rt.num_experts:  # sized by the largest id seen: align both on the larger
            E = max(rc.num_experts, rt.num_experts)
            rt, rc = to_routes(gt, E, target), to_routes(gc, E, contrast)
        return F.ftri_routes(rt, rc, stat=stat, tokens=tokens, meta=meta)
    finally:
        ep.close()
