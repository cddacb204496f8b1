"""Write tests/fixtures/smollm2_reference.npz: what Hugging Face transformers computes from OUR
file.

    python tests/make_fixtures.py [weights/smollm2-135m-instruct.f16.bin]   (or: make fixtures)

The converted parameters file is loaded back into transformers' LlamaForCausalLM (attn_qkv and
ffn_gate_up unfused into q/k/v and gate/up, float32, CPU, eager attention), so transformers runs
the very same f16-rounded weights the kernel runs. Stored (float32), for each prompt N (short
ones, a chat prompt, and over 600 tokens of the Apache license that transformers ships): its
token ids `ids_N`; `logits32_N`, the last position's logits over the whole vocabulary with
transformers' own f32 KV cache (the exact answer); `logits16_N`, those logits computed with K
and V rounded to f16 as they are cached (as the kernel's default cache and llama.cpp keep
them), on the vocabulary ids `cols16_N` (the row's top 64 and 1024 random ones: a full row
costs 0.2 MB). All-position logits of the chat prompt on a subset of the vocabulary (each
position's top 32 and 512 random ids), both ways; greedy continuations (f32 KV cache) with
each step's top-1/top-2 margin. The script also checks
pyllm/reference.py against transformers (printing max |diff|), which validates the reference.
Never touches the network.
"""

import os
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers  # noqa: E402
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM  # noqa: E402
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding  # noqa: E402

from pyllm import format  # noqa: E402
from pyllm.reference import reference_logits  # noqa: E402

DEFAULT_WEIGHTS = os.path.join(os.path.dirname(HERE), "weights", "smollm2-135m-instruct.f16.bin")
OUT = os.path.join(HERE, "fixtures", "smollm2_reference.npz")
CHAT = (
    "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
    "<|im_end|>\n<|im_start|>user\nWhat is the tallest mountain in the world?<|im_end|>\n"
    "<|im_start|>assistant\n"
)
PROMPTS = [
    "The capital of France is",
    "Once upon a time, in a small village nestled between two mountains, there lived an old "
    "clockmaker who had never once been late for anything in his entire life.",
    (
        "def fibonacci(n):\n    if n < 2:\n        return n\n"
        "    return fibonacci(n - 1) + fibonacci(n - 2)\n"
    ),
    (
        "In 2023 the city had 8,045,311 residents; "
        "revenue rose 3.14% to $104.5 million (up from 97.2)."
    ),
    CHAT,
    "Über den Wolken muss die Freiheit wohl grenzenlos sein. 日本語のテキスト, café 🙂!",
]
LONG_PROMPT_CHARS = 3600  # about 730 tokens: past the kernel's first 512-position attention segment


def long_prompt():
    """Real text over 600 tokens: the Apache license's terms, from transformers' LICENSE."""
    import importlib.metadata

    dist = importlib.metadata.distribution("transformers")
    text = next(f for f in dist.files if f.name == "LICENSE").read_text()
    text = text[text.index("TERMS AND CONDITIONS") :]
    return text[: text.index("\n\n", LONG_PROMPT_CHARS)]


GREEDY = [PROMPTS[0], CHAT, "Here is a list of the planets of the solar system:\n1."]
GREEDY_STEPS = 24
ALLPOS_PROMPT = 4  # all-position logits for this prompt (the chat one) ...
ALLPOS_RANDOM_COLS = 512  # ... on these many random vocabulary ids plus each position's top 32
LAST16_RANDOM_COLS = 1024  # the f16-cache last-position logits: these many random ids + the top 64


def hf_tokenizer(tok_meta):
    """SmolLM2's tokenizer.json pipeline, rebuilt from the file's vocabulary and merges."""
    tokens = tok_meta["tokens"]
    merges = [
        tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in tok_meta["merges"]
    ]
    tk = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
    tk.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    tk.decoder = decoders.ByteLevel()
    types = tok_meta.get("token_type") or []
    special = [t for t, ty in zip(tokens, types) if ty == 3]  # control tokens: <|im_start|>, ...
    tk.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special])
    return tk


def hf_model(mf):
    c = mf.config
    nh, nkv, hd, hid = c["n_heads"], c["n_kv_heads"], c["head_dim"], c["hidden_dim"]
    if c["sliding_window"]:
        sys.exit("make_fixtures: sliding-window models are not supported here (LlamaConfig)")
    theta = c.get("rope_theta") or c.get("rope_freq_base")
    if theta is None:
        sys.exit(f"make_fixtures: no rope_theta in the file's meta config (keys: {sorted(c)})")
    tied = bool(c["flags"] & format.FLAG_TIED_OUTPUT)
    bias = bool(c["flags"] & format.FLAG_QKV_BIAS)
    cfg = LlamaConfig(
        vocab_size=c["vocab_size"],
        hidden_size=c["dim"],
        intermediate_size=hid,
        num_hidden_layers=c["n_layers"],
        num_attention_heads=nh,
        num_key_value_heads=nkv,
        head_dim=hd,
        max_position_embeddings=c["max_seq_len"],
        rms_norm_eps=c["norm_eps"],
        rope_parameters={"rope_type": "default", "rope_theta": float(theta)},
        tie_word_embeddings=tied,
        attention_bias=bias,
        mlp_bias=False,
        hidden_act="silu",
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )
    cfg._attn_implementation = "eager"
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)

    def w(name):
        return torch.from_numpy(np.asarray(mf.matrix(name), dtype=np.float32))

    sd = {
        "model.embed_tokens.weight": w("tok_embd"),
        "model.norm.weight": w("output_norm"),
        "lm_head.weight": w("tok_embd") if tied else w("output"),
    }
    for i in range(c["n_layers"]):
        p, q = f"blk.{i}.", f"model.layers.{i}."
        qkv = w(p + "attn_qkv")
        (
            sd[q + "self_attn.q_proj.weight"],
            sd[q + "self_attn.k_proj.weight"],
            sd[q + "self_attn.v_proj.weight"],
        ) = qkv.split([nh * hd, nkv * hd, nkv * hd])
        if bias:
            b = w(p + "attn_qkv_bias")
            (
                sd[q + "self_attn.q_proj.bias"],
                sd[q + "self_attn.k_proj.bias"],
                sd[q + "self_attn.v_proj.bias"],
            ) = b.split([nh * hd, nkv * hd, nkv * hd])
        sd[q + "self_attn.o_proj.weight"] = w(p + "attn_out")
        sd[q + "mlp.gate_proj.weight"], sd[q + "mlp.up_proj.weight"] = w(p + "ffn_gate_up").split(
            [hid, hid]
        )
        sd[q + "mlp.down_proj.weight"] = w(p + "ffn_down")
        sd[q + "input_layernorm.weight"] = w(p + "attn_norm")
        sd[q + "post_attention_layernorm.weight"] = w(p + "ffn_norm")
    sd = {k: v.contiguous() for k, v in sd.items()}
    missing, unexpected = model.load_state_dict(sd, strict=False, assign=True)
    missing = [k for k in missing if "rotary_emb" not in k]
    assert not missing and not unexpected, (missing, unexpected)
    if tied:
        model.tie_weights()
    # the non-persistent RoPE buffer was created on the meta device: recompute it on the CPU
    rot = model.model.rotary_emb = LlamaRotaryEmbedding(cfg)
    inv_freq = rot.inv_freq
    ours = np.asarray(mf.tensors["rope_freqs"], dtype=np.float32)
    err = np.abs(inv_freq.numpy() - ours).max() / ours.max()
    print(
        f"rope: theta={theta}; file's rope_freqs vs transformers' inv_freq: max rel diff {err:.2e}"
    )
    assert err < 1e-5, "the file's rope_freqs disagree with rope_theta"
    rot.inv_freq.copy_(torch.from_numpy(ours.copy()))  # run exactly the file's frequencies
    rot.original_inv_freq.copy_(rot.inv_freq)
    meta = [n for n, v in list(model.named_parameters()) + list(model.named_buffers()) if v.is_meta]
    assert not meta, f"left on the meta device: {meta}"
    model.eval()
    return model.float()


class F16Cache(DynamicCache):
    """Keys and values rounded to float16 as they are stored, like the kernel's KV cache (and
    llama.cpp's default): attention then reads exactly the K and V values the kernel reads."""

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        return super().update(
            key_states.half().float(), value_states.half().float(), layer_idx, *args, **kwargs
        )


@torch.no_grad()
def hf_logits(model, ids, f16_kv=False):
    if f16_kv:
        return (
            model(torch.tensor([ids]), past_key_values=F16Cache(), use_cache=True)
            .logits[0]
            .float()
            .numpy()
        )
    return model(torch.tensor([ids]), use_cache=False).logits[0].float().numpy()


@torch.no_grad()
def hf_greedy(model, ids, steps):
    """Greedy continuation (KV-cached) and each step's top-1 minus top-2 logit."""
    out, margins, past, x = [], [], None, torch.tensor([ids])
    for _ in range(steps):
        r = model(x, past_key_values=past, use_cache=True)
        past, top = r.past_key_values, torch.topk(r.logits[0, -1].float(), 2)
        out.append(int(top.indices[0]))
        margins.append(float(top.values[0] - top.values[1]))
        x = torch.tensor([[out[-1]]])
    return out, margins


def main():
    path = sys.argv[1] if len(sys.argv) > 1 else DEFAULT_WEIGHTS
    if not os.path.exists(path):
        sys.exit(f"make_fixtures: {path} does not exist; run `make weights` first")
    torch.set_num_threads(os.cpu_count() or 1)
    t0 = time.time()
    mf = format.read(path)
    tok = hf_tokenizer(mf.meta["tokenizer"])
    model = hf_model(mf)
    print(f"loaded {path} into transformers in {time.time() - t0:.1f}s")

    prompts = PROMPTS + [long_prompt()]
    greedy = GREEDY + [prompts[-1]]
    data = {"prompts": np.array(prompts), "greedy_prompts": np.array(greedy)}
    worst_ref, worst_ref16, ref16_last = 0.0, 0.0, []
    for n, prompt in enumerate(prompts):
        ids = tok.encode(prompt).ids
        assert tok.decode(ids, skip_special_tokens=False) == prompt, "tokenizer round trip"
        lg, lg16 = hf_logits(model, ids), hf_logits(model, ids, f16_kv=True)
        data[f"ids_{n}"] = np.array(ids, dtype=np.int32)
        data[f"logits32_{n}"] = lg[-1].astype(np.float32)
        rng = np.random.default_rng(n)
        cols = set(rng.choice(lg.shape[1], LAST16_RANDOM_COLS, replace=False).tolist())
        cols = np.array(sorted(cols | set(np.argsort(-lg16[-1])[:64].tolist())), dtype=np.int32)
        data[f"cols16_{n}"] = cols
        data[f"logits16_{n}"] = lg16[-1, cols].astype(np.float32)
        d32 = float(np.abs(reference_logits(mf, ids, cache_type="f32") - lg).max())
        r16 = np.abs(reference_logits(mf, ids, cache_type="f16") - lg)
        ref16_last.append(float(r16[-1].max()))
        worst_ref, worst_ref16 = max(worst_ref, d32), max(worst_ref16, float(r16.max()))
        print(
            f"prompt {n}: {len(ids):2d} tokens, top-1 {tok.decode([int(lg[-1].argmax())])!r:9}  "
            f"max |reference - transformers| {d32:.1e}; reference with the kernel's f16 K/V: "
            f"{r16.max():.1e} (last position {r16[-1].max():.1e}, mean {r16.mean():.1e})"
        )
        if n == ALLPOS_PROMPT:
            rng = np.random.default_rng(0)
            cols = set(rng.choice(lg.shape[1], ALLPOS_RANDOM_COLS, replace=False).tolist())
            cols |= set(np.argsort(-lg, axis=1)[:, :32].ravel().tolist())
            cols = np.array(sorted(cols), dtype=np.int32)
            data["allpos_prompt"] = np.int32(n)
            data["allpos_cols"] = cols
            data["allpos_logits"] = lg[:, cols].astype(np.float32)
            data["allpos16_logits"] = lg16[:, cols].astype(np.float32)
    # how far an exact f32 implementation with an f16 KV cache is from these logits
    data["ref_f16_kv_last_maxdiff"] = np.array(ref16_last, dtype=np.float32)
    for n, prompt in enumerate(greedy):
        ids = tok.encode(prompt).ids
        out, margins = hf_greedy(model, ids, GREEDY_STEPS)
        # the cached loop agrees with a full-sequence forward pass
        full = hf_logits(model, ids + out[:-1])[len(ids) - 1 :].argmax(1)
        agree = [a == b or m < 1e-3 for a, b, m in zip(full, out, margins)]
        assert all(agree), "KV-cached greedy decoding disagrees with the full forward pass"
        data[f"greedy_ids_{n}"] = np.array(ids, dtype=np.int32)
        data[f"greedy_out_{n}"] = np.array(out, dtype=np.int32)
        data[f"greedy_margin_{n}"] = np.array(margins, dtype=np.float32)
        print(
            f"greedy {n}: ...{prompt[-24:]!r} -> {tok.decode(out, skip_special_tokens=False)!r}"
            f"  (min margin {min(margins):.3f})"
        )
    print(
        f"max |reference - transformers| over all prompts: {worst_ref:.2e} (f32 K/V), "
        f"{worst_ref16:.2e} (f16 K/V, as the kernel)"
    )
    os.makedirs(os.path.dirname(OUT), exist_ok=True)
    np.savez_compressed(OUT, **data)
    print(f"wrote {OUT} ({os.path.getsize(OUT) / 1e6:.2f} MB) in {time.time() - t0:.1f}s")
    if worst_ref > 1e-3:
        sys.exit(
            f"make_fixtures: pyllm/reference.py disagrees with transformers by {worst_ref:.2e}"
        )


if __name__ == "__main__":
    main()
