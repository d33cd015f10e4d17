#!/usr/bin/env python3
"""Label the local model's real answers for the quality validator.

Reads prompts with machine-checkable answers (models/validator/prompts.jsonl), asks the local
model through a running `llmgenie serve` (greedy, with token log-probabilities), checks each
answer, and writes models/validator/labelled.jsonl: lines {"prompt", "answer", "acceptable",
"task", "json", "logprobs", "truncated"} that `llmgenie eval validator` reads. It also prints
the local model's acceptance rate per task class, which is what the router's default routes
are chosen from.

Usage: scripts/make_validator_set.py [--url http://127.0.0.1:11435] [--model smollm2-135m]
       (start the server first: target/release/llmgenie serve --model smollm2-135m)
"""

import argparse
import json
import re
import subprocess
import sys
import tempfile
import urllib.request
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def ask(url, model, line):
    body = {
        "model": model,
        "messages": [{"role": "user", "content": line["prompt"]}],
        "temperature": 0,
        "max_tokens": line.get("max_tokens", 128),
        "logprobs": True,
    }
    if line.get("format") == "json":
        body["response_format"] = {"type": "json_object"}
    req = urllib.request.Request(
        url + "/v1/chat/completions",
        data=json.dumps(body).encode(),
        headers={"content-type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=600) as r:
        v = json.load(r)
    choice = v["choices"][0]
    logprobs = [t["logprob"] for t in (choice.get("logprobs") or {}).get("content") or []]
    return choice["message"]["content"], logprobs, choice["finish_reason"] == "length"


def json_object(answer):
    """The JSON object of an answer: whole, fenced, or the first {...} span that parses."""
    candidates = [answer.strip()]
    m = re.search(r"```(?:json)?\s*\n(.*?)```", answer, re.S)
    if m:
        candidates.append(m.group(1).strip())
    start = answer.find("{")
    while start != -1:
        depth = 0
        for i in range(start, len(answer)):
            depth += {"{": 1, "}": -1}.get(answer[i], 0)
            if depth == 0:
                candidates.append(answer[start : i + 1])
                break
        start = answer.find("{", start + 1)
    for c in candidates:
        try:
            v = json.loads(c)
        except ValueError:
            continue
        if isinstance(v, dict):
            return v
    return None


def same(a, b):
    if isinstance(b, (int, float)) and not isinstance(b, bool):
        try:
            return abs(float(a) - float(b)) < 1e-6
        except (TypeError, ValueError):
            return False
    return str(a).strip().lower() == str(b).strip().lower()


def python_ok(answer, tests):
    m = re.search(r"```(?:python|py)?\s*\n(.*?)```", answer, re.S)
    code = m.group(1) if m else answer
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as f:
        f.write(code + "\n\n" + tests + "\n")
        path = f.name
    try:
        r = subprocess.run([sys.executable, path], capture_output=True, timeout=10)
        return r.returncode == 0
    except subprocess.TimeoutExpired:
        return False
    finally:
        Path(path).unlink(missing_ok=True)


def acceptable(answer, check):
    low = answer.lower()
    (kind, want), = check.items()
    if kind == "number":
        numbers = re.findall(r"-?\d+(?:,\d{3})*(?:\.\d+)?", answer)
        return any(same(n.replace(",", ""), want) for n in numbers)
    if kind == "any":
        return any(w.lower() in low for w in want)
    if kind == "all":
        return all(w.lower() in low for w in want)
    if kind == "json":
        obj = json_object(answer)
        return obj is not None and all(k in obj and same(obj[k], v) for k, v in want.items())
    if kind == "python":
        return python_ok(answer, want)
    raise ValueError(f"unknown check {kind}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", default="http://127.0.0.1:11435")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--prompts", default=str(ROOT / "models/validator/prompts.jsonl"))
    ap.add_argument("--out", default=str(ROOT / "models/validator/labelled.jsonl"))
    args = ap.parse_args()
    lines = [json.loads(l) for l in Path(args.prompts).read_text().splitlines() if l.strip()]
    rates = defaultdict(lambda: [0, 0])
    out = []
    for i, line in enumerate(lines):
        answer, logprobs, truncated = ask(args.url, args.model, line)
        ok = acceptable(answer, line["check"])
        rates[line["task"]][0] += ok
        rates[line["task"]][1] += 1
        out.append({
            "prompt": line["prompt"],
            "answer": answer,
            "acceptable": ok,
            "task": line["task"],
            "json": line.get("format") == "json",
            "logprobs": [round(x, 4) for x in logprobs],
            "truncated": truncated,
        })
        print(f"{i + 1}/{len(lines)} {line['task']:<10} {'ok ' if ok else 'BAD'} {answer[:60]!r}",
              file=sys.stderr)
    Path(args.out).write_text("".join(json.dumps(o, ensure_ascii=False) + "\n" for o in out))
    print(f"{'class':<10} {'acceptable':>10} {'n':>4}")
    for task, (good, n) in sorted(rates.items()):
        print(f"{task:<10} {good / n:>10.2f} {n:>4}")
    total = sum(g for g, _ in rates.values()), sum(n for _, n in rates.values())
    print(json.dumps({"acceptable": total[0] / total[1], "n": total[1],
                      "by_task": {t: g / n for t, (g, n) in sorted(rates.items())}}))


if __name__ == "__main__":
    main()
