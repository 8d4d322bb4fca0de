"""A tiny llama-architecture GGUF model, generated on the spot (no download).

Two layers, 64-dimensional, random weights, and a byte-level SentencePiece-style
vocabulary (``<unk>``, ``<s>``, ``</s>`` and the 256 byte tokens ``<0xNN>``), so any
text tokenizes to one token per UTF-8 byte. The output projection only favours
printable ASCII bytes, so every generated token is one visible character and the
model never emits end-of-sequence by itself: a generation runs to its token limit.

It loads in llama.cpp (here through ``llama-cpp-python``) in well under a second and
generates hundreds of tokens per second on one core: a real inference engine whose
figures nobody here wrote.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

N_EMBD = 64
N_FF = 128
N_HEAD = 4
N_LAYER = 2
N_CTX = 512
SPECIALS = ("<unk>", "<s>", "</s>")
N_VOCAB = len(SPECIALS) + 256


def write_tiny_llama(path: Path, seed: int = 1234) -> Path:
    """Write the model to ``path`` (a ``.gguf`` file) and return the path."""
    import gguf

    rng = np.random.default_rng(seed)

    def rand(*shape: int, scale: float = 0.08) -> np.ndarray:
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    tokens = [s.encode() for s in SPECIALS] + [f"<0x{b:02X}>".encode() for b in range(256)]
    types = [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL]
    types += [gguf.TokenType.BYTE] * 256
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("spendtap-tiny-llama")
    w.add_context_length(N_CTX)
    w.add_embedding_length(N_EMBD)
    w.add_block_count(N_LAYER)
    w.add_feed_forward_length(N_FF)
    w.add_head_count(N_HEAD)
    w.add_head_count_kv(N_HEAD)
    w.add_rope_dimension_count(N_EMBD // N_HEAD)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores([0.0] * N_VOCAB)
    w.add_token_types(types)
    w.add_unk_token_id(0)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)
    w.add_tensor("token_embd.weight", rand(N_VOCAB, N_EMBD, scale=1.0))
    for i in range(N_LAYER):
        p = f"blk.{i}."
        w.add_tensor(p + "attn_norm.weight", np.ones(N_EMBD, dtype=np.float32))
        for name in ("attn_q", "attn_k", "attn_v", "attn_output"):
            w.add_tensor(p + name + ".weight", rand(N_EMBD, N_EMBD))
        w.add_tensor(p + "ffn_norm.weight", np.ones(N_EMBD, dtype=np.float32))
        w.add_tensor(p + "ffn_gate.weight", rand(N_FF, N_EMBD))
        w.add_tensor(p + "ffn_up.weight", rand(N_FF, N_EMBD))
        w.add_tensor(p + "ffn_down.weight", rand(N_EMBD, N_FF))
    w.add_tensor("output_norm.weight", np.ones(N_EMBD, dtype=np.float32))
    out = np.zeros((N_VOCAB, N_EMBD), dtype=np.float32)
    printable = [len(SPECIALS) + b for b in range(0x21, 0x7F)]  # '!'..'~'
    out[printable] = rand(len(printable), N_EMBD, scale=4.0)
    w.add_tensor("output.weight", out)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
