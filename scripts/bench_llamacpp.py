"""Helper of scripts/bench_vs_llamacpp: measures llama.cpp (llama-cpp-python) the way
`llmgenie bench` measures itself, and prints the side-by-side table.

Modes:
  --resolve NAME            print the .gguf path of a catalogue name (or the path itself)
  --one ...                 one llama.cpp run in this process; prints a JSON object
  --compare ...             alternate llmgenie and llama.cpp runs; print medians and ratios
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# The same filler text `llmgenie bench` repeats to build its prompt (src/bench.rs).
FILLER = ("The history of computing is a story of people who wanted to calculate faster. "
          "Early machines used gears and levers; later ones used relays, vacuum tubes and transistors. "
          "Each generation made the previous one look slow, and each brought new questions about what "
          "a machine should do, who should program it, and how its answers could be trusted. ")


def resolve(name):
    if name.endswith(".gguf") or "/" in name:
        return str(Path(name).resolve())
    models = Path(os.environ.get("LLMGENIE_MODELS", ROOT / "models"))
    with open(ROOT / "models" / "catalog.toml", "rb") as f:
        cat = tomllib.load(f)
    for e in cat["model"]:
        if name.lower() == e["name"] or name.lower() in [a.lower() for a in e.get("aliases", [])]:
            return str((models / e["file"]).resolve())
    sys.exit(f"unknown model {name}")


def peak_rss():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def one(args):
    import llama_cpp
    t0 = time.perf_counter()
    llm = llama_cpp.Llama(model_path=args.model_path, n_ctx=args.prompt_tokens + args.gen_tokens + 16,
                          n_threads=args.threads, n_threads_batch=args.threads, n_batch=512,
                          verbose=False)
    load_s = time.perf_counter() - t0
    filler = llm.tokenize(FILLER.encode(), add_bos=False, special=False)
    prompt = []
    while len(prompt) < args.prompt_tokens:
        prompt.extend(filler)
    prompt = prompt[:args.prompt_tokens]
    t1 = time.perf_counter()
    llm.eval(prompt)
    prefill = args.prompt_tokens / (time.perf_counter() - t1)
    t2 = time.perf_counter()
    import numpy as np
    n_vocab = llm.n_vocab()
    for _ in range(args.gen_tokens):
        # The last evaluated row (llama-cpp-python keeps no scores without logits_all).
        logits = np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(n_vocab,))
        nxt = int(logits.argmax())
        llm.eval([nxt])
    decode = args.gen_tokens / (time.perf_counter() - t2)
    print(json.dumps({"prefill_tokens_per_s": prefill, "decode_tokens_per_s": decode,
                      "load_s": load_s, "peak_rss_bytes": peak_rss()}))


def compare(args):
    keys = ["prefill_tokens_per_s", "decode_tokens_per_s", "load_s", "peak_rss_bytes"]
    ours, theirs = {k: [] for k in keys}, {k: [] for k in keys}
    for i in range(args.runs):
        mine = subprocess.run([args.bin, "bench", "--model", args.model, "--threads", str(args.threads),
                               "--prompt-tokens", str(args.prompt_tokens), "--gen-tokens", str(args.gen_tokens),
                               "--runs", "1", "--json"], check=True, capture_output=True, text=True)
        lc = subprocess.run([sys.executable, __file__, "--one", "--model-path", args.model_path,
                             "--threads", str(args.threads), "--prompt-tokens", str(args.prompt_tokens),
                             "--gen-tokens", str(args.gen_tokens)], check=True, capture_output=True, text=True)
        m, l = json.loads(mine.stdout), json.loads(lc.stdout.strip().splitlines()[-1])
        for k in keys:
            ours[k].append(m[k])
            theirs[k].append(l[k])
        print(f"run {i + 1}/{args.runs}: llmgenie decode {m['decode_tokens_per_s']:.1f} t/s, "
              f"llama.cpp decode {l['decode_tokens_per_s']:.1f} t/s", file=sys.stderr)
    print(f"model {args.model}, {args.threads} threads, prompt {args.prompt_tokens} tokens, "
          f"{args.gen_tokens} generated, median of {args.runs} alternating runs")
    print(f"| figure | llmgenie | llama.cpp | ratio |")
    print(f"| --- | --- | --- | --- |")
    fmt = {"prefill_tokens_per_s": ("prefill tokens/s", 1), "decode_tokens_per_s": ("decode tokens/s", 1),
           "load_s": ("load s", 1), "peak_rss_bytes": ("peak RSS MiB", 1 / (1 << 20))}
    for k in keys:
        label, scale = fmt[k]
        a, b = statistics.median(ours[k]), statistics.median(theirs[k])
        print(f"| {label} | {a * scale:.2f} | {b * scale:.2f} | {a / b:.2f} |")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--resolve")
    p.add_argument("--one", action="store_true")
    p.add_argument("--compare", action="store_true")
    p.add_argument("--bin")
    p.add_argument("--model")
    p.add_argument("--model-path")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--prompt-tokens", type=int, default=512)
    p.add_argument("--gen-tokens", type=int, default=128)
    p.add_argument("--runs", type=int, default=5)
    a = p.parse_args()
    if a.resolve:
        print(resolve(a.resolve))
    elif a.one:
        one(a)
    elif a.compare:
        compare(a)
    else:
        p.error("one of --resolve, --one, --compare")


if __name__ == "__main__":
    main()
