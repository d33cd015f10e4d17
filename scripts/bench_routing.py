#!/usr/bin/env python3
"""What validation costs a streaming client: time to the first token and to the end, for the
same prompts sent pinned to the local model and as `auto` (answered locally, validated before
the first token is sent). Alternates the two, greedy, and prints medians.

Usage: target/release/llmgenie serve --model smollm2-135m &   (no ANTHROPIC_API_KEY: nothing
       escalates, so only the cost of validating first is measured)
       scripts/bench_routing.py [--url http://127.0.0.1:11435] [--runs 3] [--max-tokens 64]
"""

import argparse
import json
import statistics
import time
import urllib.request

PROMPTS = [
    "What is the capital of Canada?",
    "Summarize in one sentence: The library will close early on Friday for staff training and "
    "reopen on Saturday at the usual time.",
    "Extract the name and the city as JSON: Maria lives in Lisbon.",
    "Write a two-line poem about autumn leaves.",
    "Who wrote Pride and Prejudice?",
]


def stream(url, model, prompt, max_tokens):
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": prompt}],
                       "temperature": 0, "max_tokens": max_tokens, "stream": True}).encode()
    req = urllib.request.Request(url + "/v1/chat/completions", data=body,
                                 headers={"content-type": "application/json"})
    start = time.perf_counter()
    first = None
    with urllib.request.urlopen(req, timeout=600) as r:
        for line in r:
            line = line.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            obj = json.loads(line[6:])
            delta = (obj.get("choices") or [{}])[0].get("delta", {})
            if first is None and delta.get("content"):
                first = time.perf_counter() - start
    return first or 0.0, time.perf_counter() - start


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", default="http://127.0.0.1:11435")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=64)
    args = ap.parse_args()
    results = {args.model: ([], []), "auto": ([], [])}
    stream(args.url, args.model, "Hi", 4)  # warm up
    for _ in range(args.runs):
        for p in PROMPTS:
            for model in (args.model, "auto"):
                ttft, total = stream(args.url, model, p, args.max_tokens)
                results[model][0].append(ttft)
                results[model][1].append(total)
    print(f"{'model':<14} {'first token ms':>15} {'whole answer ms':>16}")
    for model, (ttft, total) in results.items():
        print(f"{model:<14} {statistics.median(ttft) * 1e3:>15.0f} {statistics.median(total) * 1e3:>16.0f}")
    print(json.dumps({m: {"ttft_ms": statistics.median(t) * 1e3, "total_ms": statistics.median(w) * 1e3}
                      for m, (t, w) in results.items()}))


if __name__ == "__main__":
    main()
