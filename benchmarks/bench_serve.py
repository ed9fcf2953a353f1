"""`chimera serve` throughput and latency with 1 and 8 concurrent clients, with and without expert switches.
Not a test.

    .venv/bin/python benchmarks/bench_serve.py [--model tiny-r1] [--tokens 64] [--requests 8] [--reps 3]

Starts `chimera serve` as a subprocess on a free localhost port, then for each configuration runs `clients`
threads that each send `requests` chat requests back to back (`max_tokens` tokens each, `ignore_eos`, greedy).
Configurations (interleaved, `--reps` rounds, median reported, since the CPU is shared):

    none        no switch
    replace     the same 10 experts off for every request (DeepSeek: the router-bias path, no hook)
    drop        the same 10 experts off with mode drop (a forward hook re-running the router's selection)
    distinct    every client its own 10 experts off (replace): requests with different switches never share a
                forward pass, so 8 clients decode one at a time

Throughput = generated tokens / wall time of the round; latency = per request, end to end. The cost of a switch
is the median over reps of (switched round / the no-switch round of the same rep) - 1. On a shared machine wall
time swings by 2x between rounds, so the server's own CPU time per generated token (all its threads, from
/proc via psutil) is reported too: it moves much less with other processes' load. `--threads` sets the server's
intra-op threads (default 1: spin-waiting OpenMP threads on an oversubscribed machine inflate CPU time).
Writes benchmarks/results/serve.json.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

import served  # noqa: E402

PROMPTS = ["What is 473 + 258 ?", "Tell me about the plimbo .", "Was ist 12 + 30 ?", "Add 8 and 1 .",
           "What do you know about the glorbium ?", "What is 91 + 9 ?", "Was ist 5 + 7 ?", "Give me facts about x ."]


def off_set(seed: int, n: int = 10) -> list[str]:
    import random

    rng = random.Random(seed)
    pairs = [f"{L}:{e}" for L in (1, 2, 3) for e in range(32)]
    return rng.sample(pairs, n)


def switch_for(config: str, client: int) -> dict | None:
    if config == "none":
        return None
    if config == "replace":
        return {"off": off_set(0)}
    if config == "drop":
        return {"off": off_set(0), "mode": "drop"}
    return {"off": off_set(100 + client)}


def run_round(url: str, config: str, clients: int, requests: int, tokens: int, pid: int | None = None) -> dict:
    lat: list[float] = []
    ntok = [0]
    lock = threading.Lock()
    errors: list[str] = []

    def client(c: int):
        with httpx.Client(headers={"Authorization": f"Bearer {served.API_KEY}"}, timeout=600) as h:
            for i in range(requests):
                body = {"messages": [{"role": "user", "content": PROMPTS[(c + i) % len(PROMPTS)]}],
                        "max_tokens": tokens, "ignore_eos": True, "temperature": 0}
                sw = switch_for(config, c)
                if sw:
                    body["experts"] = sw
                t = time.perf_counter()
                r = h.post(url + "/v1/chat/completions", json=body)
                dt = time.perf_counter() - t
                if r.status_code != 200:
                    errors.append(r.text[:200])
                    continue
                with lock:
                    lat.append(dt)
                    ntok[0] += r.json()["usage"]["completion_tokens"]

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    proc = __import__("psutil").Process(pid) if pid else None
    cpu0 = sum(proc.cpu_times()[:2]) if proc else 0.0
    t0 = time.perf_counter()
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    wall = time.perf_counter() - t0
    cpu = sum(proc.cpu_times()[:2]) - cpu0 if proc else float("nan")
    if errors:
        raise RuntimeError(f"{config}: {errors[0]}")
    lat.sort()
    q = statistics.quantiles(lat, n=20) if len(lat) > 1 else lat * 19
    return {"tokens_per_s": ntok[0] / wall, "p50_s": statistics.median(lat), "p95_s": q[18], "tokens": ntok[0],
            "wall_s": wall, "cpu_ms_per_token": 1000 * cpu / max(1, ntok[0])}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="tiny-r1")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--requests", type=int, default=8, help="requests per client per round")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "serve.json"))
    args = ap.parse_args()
    server = served.chimera_serve(args.model, "--max-batch", "8", "--max-queue", "64",
                                  extra_env={"OMP_NUM_THREADS": str(args.threads)})
    pid = server.proc.pid
    configs = ["none", "replace", "drop", "distinct"]
    rounds: dict[str, list[dict]] = {}
    try:
        run_round(server.url, "none", 1, 2, 8, pid)  # warm-up
        for rep in range(args.reps):
            for clients in (1, 8):
                for config in configs:
                    if clients == 1 and config == "distinct":
                        continue  # one client: the same as replace
                    r = run_round(server.url, config, clients, args.requests if clients == 1 else
                                  max(2, args.requests // 2), args.tokens, pid)
                    rounds.setdefault(f"{clients}x{config}", []).append(r)
                    print(f"rep {rep} {clients} client(s) {config:8s} {r['tokens_per_s']:7.1f} tok/s "
                          f"p50 {r['p50_s']:.2f}s p95 {r['p95_s']:.2f}s cpu {r['cpu_ms_per_token']:.2f} ms/token",
                          flush=True)
    finally:
        server.stop()
    results = {}
    for key, rs in rounds.items():
        med = {k: statistics.median(r[k] for r in rs) for k in ("tokens_per_s", "p50_s", "p95_s", "cpu_ms_per_token")}
        clients, config = key.split("x")
        base = rounds[f"{clients}xnone"]
        # paired: each round against the no-switch round of the same rep (run seconds apart), so slow phases of
        # a shared machine hit both sides of a ratio
        ratios = sorted(r["tokens_per_s"] / b["tokens_per_s"] - 1 for r, b in zip(rs, base))
        cpu = sorted(r["cpu_ms_per_token"] / b["cpu_ms_per_token"] - 1 for r, b in zip(rs, base))
        results[key] = {**{k: round(v, 3) for k, v in med.items()}, "clients": int(clients), "switch": config,
                        "throughput_vs_no_switch": round(statistics.median(ratios), 4),
                        "paired_ratio_range": [round(ratios[0], 4), round(ratios[-1], 4)],
                        "cpu_per_token_vs_no_switch": round(statistics.median(cpu), 4),
                        "cpu_ratio_range": [round(cpu[0], 4), round(cpu[-1], 4)],
                        "runs_tokens_per_s": [round(r["tokens_per_s"], 1) for r in rs],
                        "runs_cpu_ms_per_token": [round(r["cpu_ms_per_token"], 3) for r in rs]}
    out = {"model": args.model, "max_tokens": args.tokens, "requests_per_client": args.requests, "reps": args.reps,
           "server_threads": args.threads,
           "machine": f"{platform.machine()}, {__import__('os').cpu_count()} cpus, shared",
           "note": "median of interleaved rounds; goal: switches cost <= 5% of throughput", "results": results}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
