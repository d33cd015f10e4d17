"""Record llama.cpp's logits along the reference greedy paths (tests/data/logits_NAME.json).

For every chat case of tests/data/reference_NAME.json, llama.cpp (llama-cpp-python, the same
version and thread count the reference ids were made with) evaluates the prompt followed by the
reference greedy tokens, and we keep, for each generation step, the top 8 (token, logit) pairs and
the logit of the token llama.cpp chose. The tests use these to tell a real divergence from a
near-tie. Run with the venv scripts/bench_vs_llamacpp builds:

  ~/.cache/llmgenie/llamacpp-venv/bin/python scripts/make_reference_logits.py smollm2 models/SmolLM2-135M-Instruct.Q4_1.gguf
"""
import json
import sys
from pathlib import Path

import llama_cpp
import numpy as np

ROOT = Path(__file__).resolve().parent.parent


def main(name, model_path, threads=2):
    ref = json.loads((ROOT / "tests" / "data" / f"reference_{name}.json").read_text())
    llm = llama_cpp.Llama(model_path=model_path, n_ctx=512, n_threads=threads, n_threads_batch=threads,
                          verbose=False)
    out = {"engine": f"llama.cpp via llama-cpp-python {llama_cpp.__version__}", "threads": threads, "cases": []}
    for case in ref["chat"]:
        llm.reset()
        prompt, greedy = case["prompt_ids"], case["greedy_ids"]
        # Prompt in one batch, then one token at a time, as generation does.
        llm.eval(prompt)
        steps = []
        for i in range(len(greedy)):
            # The last evaluated row (llama-cpp-python keeps no scores without logits_all).
            logits = np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(llm.n_vocab(),)).astype(np.float64)
            top = np.argsort(-logits)[:8]
            steps.append({"top": [[int(t), round(float(logits[t]), 4)] for t in top]})
            assert np.abs(logits).sum() > 0, "no logits came back"
            assert int(top[0]) == greedy[i] or abs(logits[top[0]] - logits[greedy[i]]) < 1e-3, (name, i)
            llm.eval([greedy[i]])
        out["cases"].append(steps)
    path = ROOT / "tests" / "data" / f"logits_{name}.json"
    path.write_text(json.dumps(out, separators=(",", ":")) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]) if len(sys.argv) > 3 else 2)
