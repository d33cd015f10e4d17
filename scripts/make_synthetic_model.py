"""Write a GGUF file with the shape of a large model and random weights, for speed measurements
of models that cannot be downloaded here (no model hub is reachable from the test machines).

    python scripts/make_synthetic_model.py --shape 7b --out /tmp/synthetic-7b.gguf

The file is a llama-architecture model with the layer sizes of the chosen shape, quantized as
Q4_K_M files are (Q4_K matrices; Q6_K for the value and down projections of every other layer
and for the output projection), and the vocabulary, tokenizer and chat template of a donor GGUF
(default: the SmolLM2 test model), so that llmgenie and llama.cpp both load and run it. Its
answers are noise; its speed is that of a real model of that shape, since every kernel does the
same work whatever the weights are. Quantized blocks get random quants and fixed, small scales
(so no value is NaN or infinite and activations stay finite through the layers).

Needs the PyPI packages `gguf` and `numpy` (scripts/bench_vs_llamacpp's virtual environment has
them after `pip install gguf`).
"""
import argparse
import sys
from pathlib import Path

import numpy as np

try:
    import gguf
except ImportError:
    sys.exit("needs the gguf package: pip install gguf")

ROOT = Path(__file__).resolve().parent.parent

# hidden, layers, heads, kv heads, feed-forward width (Mistral 7B's and Llama 3 8B's layer sizes,
# and a small one for trying the script).
SHAPES = {
    "7b": (4096, 32, 32, 8, 14336),
    "3b": (3072, 28, 24, 8, 8192),
    "1b": (2048, 16, 32, 8, 8192),
    "tiny": (256, 2, 4, 2, 512),
}

Q = gguf.GGMLQuantizationType
# Bytes per block and where each block's f16 scales are, for the formats written.
BLOCK_BYTES = {Q.Q4_K: 144, Q.Q6_K: 210}
SCALE_OFFSETS = {Q.Q4_K: (0, 2), Q.Q6_K: (208,)}
SCALE = np.float16(2e-4).view(np.uint16)


def quantized(rng, rows, cols, qtype):
    """Random blocks of `qtype` for a (rows, cols) matrix, as bytes (rows, cols/256 * block)."""
    per_row = cols // 256
    size = BLOCK_BYTES[qtype]
    data = rng.integers(0, 256, size=(rows * per_row, size), dtype=np.uint8)
    for off in SCALE_OFFSETS[qtype]:
        data[:, off:off + 2] = np.frombuffer(SCALE.tobytes(), dtype=np.uint8)
    if qtype == Q.Q6_K:
        # Q6_K's sub-block scales are signed bytes: keep them small and positive.
        data[:, 192:208] = rng.integers(1, 32, size=(rows * per_row, 16), dtype=np.uint8)
    return data.reshape(rows, per_row * size)


def copy_vocabulary(writer, donor):
    """The donor's tokenizer.* keys, and its vocabulary size."""
    reader = gguf.GGUFReader(donor)
    vocab = None
    for field in reader.fields.values():
        if not field.name.startswith("tokenizer."):
            continue
        kind = field.types[0]
        if kind == gguf.GGUFValueType.ARRAY:
            sub = field.types[1]
            values = [field.parts[i] for i in field.data]
            if sub == gguf.GGUFValueType.STRING:
                values = [bytes(v).decode("utf-8") for v in values]
            else:
                values = [v.tolist()[0] for v in values]
            writer.add_array(field.name, values)
            if field.name == "tokenizer.ggml.tokens":
                vocab = len(values)
        elif kind == gguf.GGUFValueType.STRING:
            writer.add_string(field.name, bytes(field.parts[field.data[0]]).decode("utf-8"))
        else:
            value = field.parts[field.data[0]].tolist()[0]
            writer.add_key_value(field.name, value, kind)
    if vocab is None:
        sys.exit(f"{donor} has no tokenizer.ggml.tokens")
    return vocab


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", choices=sorted(SHAPES), default="7b")
    p.add_argument("--out", required=True)
    p.add_argument("--donor", default=str(ROOT / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"),
                   help="GGUF whose vocabulary, tokenizer and chat template the file gets")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    hidden, layers, heads, kv_heads, ff = SHAPES[args.shape]
    head_dim = hidden // heads
    rng = np.random.default_rng(args.seed)

    writer = gguf.GGUFWriter(args.out, "llama")
    writer.add_name(f"synthetic {args.shape} (random weights)")
    writer.add_context_length(4096)
    writer.add_embedding_length(hidden)
    writer.add_block_count(layers)
    writer.add_feed_forward_length(ff)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q4_K_M)
    vocab = copy_vocabulary(writer, args.donor)

    def matrix(name, rows, cols, qtype):
        writer.add_tensor(name, quantized(rng, rows, cols, qtype), raw_dtype=qtype)

    def norm(name, width):
        writer.add_tensor(name, np.ones(width, dtype=np.float32))

    matrix("token_embd.weight", vocab, hidden, Q.Q4_K)
    norm("output_norm.weight", hidden)
    matrix("output.weight", vocab, hidden, Q.Q6_K)
    for i in range(layers):
        heavy = Q.Q6_K if i % 2 == 0 else Q.Q4_K
        b = f"blk.{i}."
        norm(b + "attn_norm.weight", hidden)
        norm(b + "ffn_norm.weight", hidden)
        matrix(b + "attn_q.weight", heads * head_dim, hidden, Q.Q4_K)
        matrix(b + "attn_k.weight", kv_heads * head_dim, hidden, Q.Q4_K)
        matrix(b + "attn_v.weight", kv_heads * head_dim, hidden, heavy)
        matrix(b + "attn_output.weight", hidden, heads * head_dim, Q.Q4_K)
        matrix(b + "ffn_gate.weight", ff, hidden, Q.Q4_K)
        matrix(b + "ffn_up.weight", ff, hidden, Q.Q4_K)
        matrix(b + "ffn_down.weight", hidden, ff, heavy)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    size = Path(args.out).stat().st_size
    print(f"wrote {args.out}: {args.shape}, {size / 2**30:.2f} GiB")


if __name__ == "__main__":
    main()
