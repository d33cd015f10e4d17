#!/usr/bin/env python3
"""Serving benchmarks against a real `llmgenie serve` (started here, on a free port).

  scripts/bench_serving.py chat [--turns 6]
      A multi-turn chat, greedy, run twice: with the prefix cache and without it
      (LLMGENIE_PREFIX_CACHE_MB=0). Prints per-turn prompt tokens, tokens taken from the cache and
      time to first token, and the median TTFT ratio.

  scripts/bench_serving.py concurrency [--levels 1,2,4,8] [--tokens 64] [--no-batch]
      N streams at once (distinct prompts, greedy, fixed length). Prints aggregate generated
      tokens/s, median and p95 time to first token and inter-token latency per level.
      --no-batch runs the server with LLMGENIE_BATCH=0 (one sequence per forward pass).

  scripts/bench_serving.py mixed [--streams 4] [--stream-tokens 300] [--prompt-words 900]
                                 [--prefill-chunk N]
      A long prompt arrives while N streams are generating. Prints the long request's time to
      first token and the streams' inter-token latency (median, p95, worst) while it was being
      read. --prefill-chunk sets LLMGENIE_PREFILL_CHUNK (prompt tokens per step while others
      generate; the server's default is 64, 512 reads the prompt in one go).

  scripts/bench_serving.py routing [--runs 3] [--tokens 64]
      What validating before streaming costs: the same prompts pinned to the local model and as
      `auto` (answered locally and validated before the first token is sent; the server has no
      ANTHROPIC_API_KEY, so nothing escalates), alternating, greedy. Prints median time to the
      first token and to the end.

Common: --model smollm2-135m --threads N (default: all cores) --binary target/release/llmgenie
"""

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, args, env_extra=None):
        self.port = free_port()
        env = dict(os.environ, **(env_extra or {}))
        env.pop("ANTHROPIC_API_KEY", None)
        cmd = [args.binary, "serve", "--port", str(self.port), "--model", args.model]
        if args.threads:
            cmd += ["--threads", str(args.threads)]
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.2)
        raise SystemExit("server did not become ready")

    @property
    def url(self):
        return f"http://127.0.0.1:{self.port}"

    def stop(self):
        self.proc.terminate()
        self.proc.wait(timeout=60)


def stream(url, body):
    """Send a streamed chat completion; returns (ttft, token times, text, usage)."""
    body = dict(body, stream=True, stream_options={"include_usage": True})
    req = urllib.request.Request(url + "/v1/chat/completions", data=json.dumps(body).encode(),
                                 headers={"content-type": "application/json"})
    start = time.perf_counter()
    times, text, usage = [], [], None
    with urllib.request.urlopen(req, timeout=600) as r:
        for line in r:
            line = line.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            obj = json.loads(line[6:])
            if obj.get("usage"):
                usage = obj["usage"]
            for ch in obj.get("choices", []):
                piece = ch.get("delta", {}).get("content")
                if piece:
                    times.append(time.perf_counter() - start)
                    text.append(piece)
    return (times[0] if times else 0.0), times, "".join(text), usage


def chat(args):
    questions = [
        "Hi! I'm planning a trip to Lisbon. What should I see first?",
        "How many days would you recommend for the city?",
        "What local food should I try?",
        "Is it easy to get around by tram?",
        "What about a day trip outside the city?",
        "Thanks! Can you summarise the plan in three lines?",
    ][: args.turns]
    results = {}
    for label, env in (("cache", {}), ("no cache", {"LLMGENIE_PREFIX_CACHE_MB": "0"})):
        srv = Server(args, env)
        try:
            messages = [{"role": "system", "content": "You are a concise travel assistant."}]
            rows = []
            for q in questions:
                messages.append({"role": "user", "content": q})
                ttft, _, text, usage = stream(srv.url, {"model": args.model, "messages": messages,
                                                       "temperature": 0, "max_tokens": args.tokens})
                messages.append({"role": "assistant", "content": text})
                cached = (usage or {}).get("prompt_tokens_details", {}).get("cached_tokens", 0)
                rows.append((usage["prompt_tokens"], cached, ttft))
            results[label] = rows
        finally:
            srv.stop()
    print(f"{'turn':>4} {'prompt':>7} {'cached':>7} {'TTFT ms cache':>14} {'TTFT ms no cache':>17}")
    for i, (a, b) in enumerate(zip(results["cache"], results["no cache"])):
        print(f"{i + 1:>4} {a[0]:>7} {a[1]:>7} {a[2] * 1e3:>14.0f} {b[2] * 1e3:>17.0f}")
    later = slice(1, None)
    med = lambda rows: statistics.median(r[2] for r in rows[later])
    print(json.dumps({
        "turns": len(questions),
        "ttft_ms_median_turns_2_on": {"cache": med(results["cache"]) * 1e3,
                                      "no_cache": med(results["no cache"]) * 1e3},
        "cached_tokens": [r[1] for r in results["cache"]],
    }))


def percentile(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))] if xs else 0.0


def concurrency(args):
    srv = Server(args, {"LLMGENIE_BATCH": "0"} if args.no_batch else {})
    topics = ["the sea", "a city at night", "a mountain", "an old library", "a robot",
              "the moon", "a garden", "a train journey"]
    try:
        stream(srv.url, {"model": args.model, "messages": [{"role": "user", "content": "Hi"}],
                         "max_tokens": 4})
        print(f"{'streams':>7} {'tokens/s':>9} {'TTFT p50 ms':>12} {'TTFT p95 ms':>12} "
              f"{'ITL p50 ms':>11} {'ITL p95 ms':>11}")
        out = {}
        for n in [int(x) for x in args.levels.split(",")]:
            results = [None] * n

            def one(i):
                body = {"model": args.model, "temperature": 0, "max_tokens": args.tokens,
                        "messages": [{"role": "user", "content":
                                      f"Write a long, detailed story about {topics[i % len(topics)]} "
                                      f"(version {i})."}]}
                results[i] = stream(srv.url, body)

            start = time.perf_counter()
            threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            wall = time.perf_counter() - start
            tokens = sum(r[3]["completion_tokens"] for r in results)
            ttft = [r[0] for r in results]
            itl = [b - a for r in results for a, b in zip(r[1], r[1][1:])]
            row = {"tokens_per_s": tokens / wall, "ttft_p50_ms": percentile(ttft, 50) * 1e3,
                   "ttft_p95_ms": percentile(ttft, 95) * 1e3, "itl_p50_ms": percentile(itl, 50) * 1e3,
                   "itl_p95_ms": percentile(itl, 95) * 1e3}
            out[n] = row
            print(f"{n:>7} {row['tokens_per_s']:>9.1f} {row['ttft_p50_ms']:>12.0f} "
                  f"{row['ttft_p95_ms']:>12.0f} {row['itl_p50_ms']:>11.1f} {row['itl_p95_ms']:>11.1f}")
        print(json.dumps(out))
    finally:
        srv.stop()


def mixed(args):
    env = {"LLMGENIE_PREFILL_CHUNK": str(args.prefill_chunk)} if args.prefill_chunk else {}
    srv = Server(args, env)
    topics = ["the sea", "a city at night", "a mountain", "an old library", "a robot",
              "the moon", "a garden", "a train journey"]
    try:
        stream(srv.url, {"model": args.model, "messages": [{"role": "user", "content": "Hi"}],
                         "max_tokens": 4})
        results = [None] * args.streams
        base = {}

        def one(i):
            body = {"model": args.model, "temperature": 0, "max_tokens": args.stream_tokens,
                    "messages": [{"role": "user", "content":
                                  f"Write a long, detailed story about {topics[i % len(topics)]} "
                                  f"(version {i})."}]}
            offset = time.perf_counter() - base["start"]
            results[i] = (offset, stream(srv.url, body))

        long_text = " ".join(f"Item {i}: the weather was mild and the market was busy."
                             for i in range(args.prompt_words // 10))
        long_result = {}

        def long_one():
            body = {"model": args.model, "temperature": 0, "max_tokens": 8,
                    "messages": [{"role": "user",
                                  "content": long_text + "\nSummarise the list in one line."}]}
            sent = time.perf_counter()
            ttft, _, _, usage = stream(srv.url, body)
            long_result.update(sent=sent - base["start"], ttft=ttft,
                               prompt_tokens=(usage or {}).get("prompt_tokens", 0))

        base["start"] = time.perf_counter()
        threads = [threading.Thread(target=one, args=(i,)) for i in range(args.streams)]
        for t in threads:
            t.start()
        time.sleep(args.delay)
        lt = threading.Thread(target=long_one)
        lt.start()
        for t in threads + [lt]:
            t.join()
        # Streams' gaps that overlap the long prompt's reading (sent .. first token).
        lo = long_result["sent"]
        hi = lo + long_result["ttft"]
        gaps = []
        for offset, r in results:
            times = [offset + t for t in r[1]]
            for a, b in zip(times, times[1:]):
                if b >= lo and a <= hi:
                    gaps.append(b - a)
        row = {"streams": args.streams, "long_prompt_tokens": long_result["prompt_tokens"],
               "long_ttft_ms": long_result["ttft"] * 1e3,
               "itl_p50_ms": percentile(gaps, 50) * 1e3, "itl_p95_ms": percentile(gaps, 95) * 1e3,
               "itl_max_ms": max(gaps, default=0.0) * 1e3,
               "prefill_chunk": args.prefill_chunk or "default"}
        print(f"{'streams':>7} {'long prompt':>11} {'its TTFT ms':>11} {'ITL p50 ms':>11} "
              f"{'ITL p95 ms':>11} {'ITL max ms':>11}")
        print(f"{row['streams']:>7} {row['long_prompt_tokens']:>11} {row['long_ttft_ms']:>11.0f} "
              f"{row['itl_p50_ms']:>11.1f} {row['itl_p95_ms']:>11.1f} {row['itl_max_ms']:>11.1f}")
        print(json.dumps(row))
    finally:
        srv.stop()


ROUTING_PROMPTS = [
    "What is the capital of Canada?",
    "Summarize in one sentence: The library will close early on Friday for staff training and "
    "reopen on Saturday at the usual time.",
    "Extract the name and the city as JSON: Maria lives in Lisbon.",
    "Write a two-line poem about autumn leaves.",
    "Who wrote Pride and Prejudice?",
]


def routing(args):
    srv = Server(args)
    try:
        results = {args.model: ([], []), "auto": ([], [])}
        for _ in range(args.runs):
            for p in ROUTING_PROMPTS:
                for model in (args.model, "auto"):
                    ttft, times, _, _ = stream(srv.url, {
                        "model": model, "messages": [{"role": "user", "content": p}],
                        "temperature": 0, "max_tokens": args.tokens})
                    results[model][0].append(ttft)
                    results[model][1].append(times[-1] if times else ttft)
        print(f"{'model':<14} {'first token ms':>15} {'last token ms':>14}")
        for model, (ttft, total) in results.items():
            print(f"{model:<14} {statistics.median(ttft) * 1e3:>15.0f} "
                  f"{statistics.median(total) * 1e3:>14.0f}")
        print(json.dumps({m: {"ttft_ms": statistics.median(t) * 1e3,
                              "last_token_ms": statistics.median(w) * 1e3}
                          for m, (t, w) in results.items()}))
    finally:
        srv.stop()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("what", choices=["chat", "concurrency", "mixed", "routing"])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--binary", default=str(ROOT / "target/release/llmgenie"))
    ap.add_argument("--turns", type=int, default=6)
    ap.add_argument("--levels", default="1,2,4,8")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--no-batch", action="store_true")
    ap.add_argument("--streams", type=int, default=4)
    ap.add_argument("--prompt-words", type=int, default=900)
    ap.add_argument("--stream-tokens", type=int, default=300)
    ap.add_argument("--prefill-chunk", type=int, default=0)
    ap.add_argument("--delay", type=float, default=2.0,
                    help="seconds between the streams starting and the long prompt (mixed)")
    args = ap.parse_args()
    if not Path(args.binary).is_file():
        sys.exit(f"{args.binary} is missing: cargo build --release first")
    {"chat": chat, "concurrency": concurrency, "mixed": mixed, "routing": routing}[args.what](args)


if __name__ == "__main__":
    main()
