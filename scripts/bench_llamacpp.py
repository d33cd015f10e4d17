"""Helper of scripts/bench_vs_llamacpp: measures llama.cpp (llama-cpp-python) the way
`llmgenie bench` measures itself, and prints the side-by-side table.

Modes:
  --resolve NAME            print the .gguf path of a catalogue name (or the path itself)
  --one ...                 one llama.cpp run in this process; prints a JSON object
  --compare ...             alternate llmgenie and llama.cpp runs; print medians and ratios
  --one --batch 1,8 ...     llama.cpp decoding that many sequences together; prints a JSON object
  --compare --batch 1,8 ... alternate `llmgenie bench --batch` and that; print medians and ratios
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


def filler_prompt(filler, tokens, offset):
    """`tokens` tokens of the repeated filler, from token `offset` (as src/bench/mod.rs builds them)."""
    prompt = []
    while len(prompt) < tokens + offset:
        prompt.extend(filler)
    return prompt[offset:offset + tokens]


def one(args):
    import llama_cpp
    t0 = time.perf_counter()
    llm = llama_cpp.Llama(model_path=args.model_path, n_ctx=args.prompt_tokens + args.gen_tokens + 16,
                          n_threads=args.threads, n_threads_batch=args.threads, n_batch=512,
                          verbose=False)
    load_s = time.perf_counter() - t0
    filler = llm.tokenize(FILLER.encode(), add_bos=False, special=False)
    prompt = filler_prompt(filler, args.prompt_tokens, 0)
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


def one_batch(args):
    """llama.cpp's counterpart of `llmgenie bench --batch`: for each size S, S sequences, each
    prefilled with its own prompt (the filler from token offset i), then `gen_tokens` greedy steps
    in which one llama_decode call takes one token of every sequence. Each sequence has its own
    KV cache (`kv_unified = false`), as in llmgenie. Aggregate decode tokens/s per size."""
    import llama_cpp
    import numpy as np
    llm = llama_cpp.Llama(model_path=args.model_path, n_ctx=64, n_threads=args.threads,
                          n_threads_batch=args.threads, verbose=False)
    filler = llm.tokenize(FILLER.encode(), add_bos=False, special=False)
    n_vocab = llm.n_vocab()
    per_seq = args.prompt_tokens + args.gen_tokens + 16
    points = []
    for size in args.batch:
        p = llama_cpp.llama_context_default_params()
        # Each sequence gets n_ctx / n_seq_max positions; a multiple of 256 keeps it whole.
        p.n_ctx = size * ((per_seq + 255) // 256 * 256)
        p.n_batch = max(512, args.prompt_tokens, size)
        p.n_ubatch = p.n_batch
        p.n_seq_max = size
        p.n_threads = p.n_threads_batch = args.threads
        p.kv_unified = False
        ctx = llama_cpp.llama_init_from_model(llm._model.model, p)
        if not ctx:
            sys.exit(f"llama.cpp could not make a context for {size} sequences")
        batch = llama_cpp.llama_batch_init(max(args.prompt_tokens, size), 0, 1)

        def decode(entries):
            batch.n_tokens = len(entries)
            for i, (tok, pos, seq, out) in enumerate(entries):
                batch.token[i], batch.pos[i], batch.n_seq_id[i] = tok, pos, 1
                batch.seq_id[i][0], batch.logits[i] = seq, out
            rc = llama_cpp.llama_decode(ctx, batch)
            if rc != 0:
                sys.exit(f"llama_decode failed ({rc})")

        def argmax(i):
            return int(np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(ctx, i), shape=(n_vocab,)).argmax())

        nxt = []
        for s in range(size):
            prompt = filler_prompt(filler, args.prompt_tokens, s)
            decode([(t, j, s, j == len(prompt) - 1) for j, t in enumerate(prompt)])
            nxt.append(argmax(-1))
        t0 = time.perf_counter()
        for g in range(args.gen_tokens):
            decode([(nxt[s], args.prompt_tokens + g, s, True) for s in range(size)])
            nxt = [argmax(i) for i in range(size)]
        points.append({"sequences": size, "tokens_per_s": size * args.gen_tokens / (time.perf_counter() - t0)})
        llama_cpp.llama_batch_free(batch)
        llama_cpp.llama_free(ctx)
    print(json.dumps({"points": points}))


def run_pair(args, extra):
    """One `llmgenie bench` run and one llama.cpp run (a fresh process each) of the same model,
    threads and token counts, with `extra` flags for both; their JSON objects."""
    same = ["--threads", str(args.threads), "--prompt-tokens", str(args.prompt_tokens),
            "--gen-tokens", str(args.gen_tokens), *extra]
    mine = subprocess.run([args.bin, "bench", "--model", args.model, "--runs", "1", "--json", *same],
                          check=True, capture_output=True, text=True)
    lc = subprocess.run([sys.executable, __file__, "--one", "--model-path", args.model_path, *same],
                        check=True, capture_output=True, text=True)
    return json.loads(mine.stdout), json.loads(lc.stdout.strip().splitlines()[-1])


def compare_batch(args):
    sizes = ",".join(str(s) for s in args.batch)
    ours = {s: [] for s in args.batch}
    theirs = {s: [] for s in args.batch}
    for i in range(args.runs):
        mine, lc = run_pair(args, ["--batch", sizes])
        for pt in mine["points"]:
            ours[pt["sequences"]].append(pt["tokens_per_s"])
        for pt in lc["points"]:
            theirs[pt["sequences"]].append(pt["tokens_per_s"])
        last = args.batch[-1]
        print(f"run {i + 1}/{args.runs}: {last} sequences: llmgenie {ours[last][-1]:.1f} t/s, "
              f"llama.cpp {theirs[last][-1]:.1f} t/s", file=sys.stderr)
    print(f"model {args.model}, {args.threads} threads, {args.prompt_tokens}-token prompts, "
          f"{args.gen_tokens} tokens each, aggregate decode tokens/s, median of {args.runs} alternating runs")
    print("| sequences | llmgenie | vs one | llama.cpp | vs one | ratio |")
    print("| --- | --- | --- | --- | --- | --- |")
    a1, b1 = statistics.median(ours[args.batch[0]]), statistics.median(theirs[args.batch[0]])
    for s in args.batch:
        a, b = statistics.median(ours[s]), statistics.median(theirs[s])
        print(f"| {s} | {a:.1f} | {a / a1:.2f}x | {b:.1f} | {b / b1:.2f}x | {a / b:.2f} |")


def compare(args):
    keys = ["prefill_tokens_per_s", "decode_tokens_per_s", "load_s", "peak_rss_bytes"]
    ours, theirs = {k: [] for k in keys}, {k: [] for k in keys}
    for i in range(args.runs):
        m, l = run_pair(args, [])
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
    p.add_argument("--batch", type=lambda v: [int(x) for x in v.split(",")],
                   help="sequence counts, comma-separated: batched decoding instead")
    a = p.parse_args()
    if a.batch is not None and (not a.batch or min(a.batch) < 1):
        p.error("--batch takes positive sequence counts, such as 1,2,4,8")
    if a.resolve:
        print(resolve(a.resolve))
    elif a.one:
        one_batch(a) if a.batch else one(a)
    elif a.compare:
        compare_batch(a) if a.batch else compare(a)
    else:
        p.error("one of --resolve, --one, --compare")


if __name__ == "__main__":
    main()
