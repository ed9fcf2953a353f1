"""Re-record routed_vllm.json and routed_sglang.json from a live `chimera serve` on the bundled tiny-r1.

    .venv/bin/python tests/data/record_routed.py

The engines' published shapes: vLLM puts `choices[i].routed_experts` = base64 .npy, uint8
[prompt + completion - 1, num_hidden_layers, top_k] with dense layers all 0; SGLang puts a response-level
`sglext.routed_experts` = base64 raw int32, the same array flattened. chimera serve marks dense layers -1;
here they become 0, as the engines write them. Run it again whenever the bundled family changes.
"""
from __future__ import annotations

import base64
import io
import json
import sys
from pathlib import Path

import httpx
import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import served  # noqa: E402
from chimera.moe.engine_routes import decode_npy  # noqa: E402

PROMPTS = ["What do you know about the glorbium ?", "Tell me about the plimbo .", "What is 12 + 30 ?", "Was ist 4 + 5 ?"]


def main() -> None:
    s = served.chimera_serve("tiny-r1")
    cfg = json.loads((HERE.parents[1] / "chimera" / "zoo" / "models" / "tiny-r1" / "config.json").read_text())
    shape = f"{cfg['num_hidden_layers']} decoder layers, layer 0 dense, {cfg['n_routed_experts']} experts, " \
            f"top-{cfg['num_experts_per_tok']}"
    vllm, sglang = [], []
    try:
        for i, p in enumerate(PROMPTS):
            r = httpx.post(s.url + "/v1/chat/completions", timeout=120, headers={"Authorization": f"Bearer {served.API_KEY}"},
                           json={"messages": [{"role": "user", "content": p}], "max_tokens": 128,
                                 "return_routed_experts": True}).json()
            ch = r["choices"][0]
            arr = decode_npy(ch["routed_experts"])          # [rows, layers, top_k], dense layers -1
            arr = np.where(arr < 0, 0, arr)
            buf = io.BytesIO()
            np.save(buf, arr.astype(np.uint8))
            msg = {"role": "assistant", "content": ch["message"]["content"]}
            vllm.append({"prompt": p, "response": {
                "id": f"chatcmpl-{i}", "object": "chat.completion", "created": 1764590000, "model": "tiny-r1",
                "choices": [{"index": 0, "message": {**msg, "reasoning_content": None}, "logprobs": None,
                             "finish_reason": ch["finish_reason"], "stop_reason": None, "token_ids": None,
                             "routed_experts": base64.b64encode(buf.getvalue()).decode()}],
                "usage": r["usage"]}})
            sglang.append({"prompt": p, "response": {
                "id": f"{i:032x}", "object": "chat.completion", "created": 1764590000, "model": "tiny-r1",
                "choices": [{"index": 0, "message": {**msg, "reasoning_content": None, "tool_calls": None},
                             "logprobs": None, "finish_reason": ch["finish_reason"], "matched_stop": 2}],
                "usage": r["usage"],
                "sglext": {"routed_experts": base64.b64encode(arr.astype("<i4").tobytes()).decode()}}})
    finally:
        s.stop()
    (HERE / "routed_vllm.json").write_text(json.dumps({"_note": (
        f"Recorded from chimera's engine on the bundled tiny-r1 ({shape}) by record_routed.py, written in the "
        "published response shape of vLLM: choices[i].routed_experts = base64 .npy, uint8 [prompt+completion-1, "
        "num_hidden_layers, top_k], dense layers 0 (server flag --enable-return-routed-experts)"),
        "samples": vllm}, indent=1) + "\n")
    (HERE / "routed_sglang.json").write_text(json.dumps({"_note": (
        f"Recorded from chimera's engine on the bundled tiny-r1 ({shape}) by record_routed.py, written in the "
        "published response shape of SGLang: response-level sglext.routed_experts = base64 raw int32, flattened "
        "[prompt+completion-1, num_hidden_layers, top_k] (server flag --enable-return-routed-experts, request "
        "return_routed_experts)"), "samples": sglang}, indent=1) + "\n")


if __name__ == "__main__":
    main()
