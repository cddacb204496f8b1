"""pyllm against its peers, side by side in one run: the same tests, model, thread counts.

    python benchmarks/compare.py [MODEL] [-p 512] [-n 128] [-t 1,2] [-r 3] [-d 0]
        [--decode-depths 512,2048,4096] [--engines pyllm,llama.cpp,hf-f32,hf-bf16]
    (or: make compare)

Engines (each in its own worker process, so peak RSS, thread pools and OpenMP runtimes
stay apart; the idle ones block on a pipe):
  pyllm         Model.forward_at on token ids (pyllm/bench.py's Runner, exactly `pyllm bench`)
  llama.cpp     llama-cpp-python's low-level API on an F16 GGUF written from MODEL (the same
                f16 weights; Q/K rows permuted back to llama.cpp's interleaved RoPE order), timed
                as llama-bench times: pp = llama_decode of one batch of n tokens (n_batch 2048,
                n_ubatch 512, logits of the last token), tg = n single-token llama_decode +
                llama_synchronize; n_threads = n_threads_batch = t; default context params
                (f16 KV cache, flash attention auto). llama.cpp-norepack: use_extra_bufts off.
  hf-f32/bf16   transformers LlamaForCausalLM built from MODEL (f32 = the f16 values exactly;
                bf16 = rounded), sdpa attention, DynamicCache; pp = one forward with
                logits_to_keep=1, tg = n single-token forwards with the cache.
No sampling, no tokenizer in any timing. Depth (-d, --decode-depths): that many tokens are in
the cache before the test (filled untimed; the cache is cut back to the depth after each run).

Per test: one warmup run per engine (pp: the whole test, tg: one token, like llama-bench),
then -r rounds, each running every engine once in turn (A/B/A/B..., the starting engine
rotating), with --gap seconds of quiet between runs so spinning worker threads settle.
Prints a table with each engine's t/s (mean ± stddev) and pyllm/peer ratios, and "other
load": the largest share of the machine that processes outside this run used during any of
the test's timed runs (from /proc/stat). The machine is shared: before each timed run the
coordinator waits for other processes to fall under --max-other-load, and redoes a run they
disturbed (--retries); a row whose other load is still high is contaminated. After the runs,
the machine's ceilings (pyllm.bench.ceilings) and pyllm's fraction of them (--no-roofline: not).
Writes JSON
(--json-out) for benchmarks/plot.py. Before timing, every engine's last-token logits for one
prompt are compared with pyllm's (a same-weights check).
"""

import argparse
import base64
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.append(
    ROOT
)  # after PYTHONPATH: PYTHONPATH=build/x python benchmarks/compare.py times build/x's kernel

from pyllm import bench, format  # noqa: E402
from pyllm.bench import Test  # noqa: E402

DEFAULT_MODEL = os.path.join(ROOT, "weights", "smollm2-135m-instruct.f16.bin")
DEFAULT_JSON = os.path.join(HERE, "out", "compare.json")
ALL_ENGINES = ("pyllm", "llama.cpp", "llama.cpp-norepack", "hf-f32", "hf-bf16")
DEFAULT_ENGINES = "pyllm,llama.cpp,hf-f32,hf-bf16"
CHECK_TOKENS = 32  # random ids whose last logits every engine must agree on


# ---------------- the F16 GGUF of the same weights ----------------
def hf_to_gguf_rows(w, n_head):
    """Q/K rows from Hugging Face's rotate-half order to llama.cpp's interleaved order
    (convert_hf_to_gguf.py's permute)."""
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def write_gguf(src, out):
    """An F16 GGUF holding exactly src's f16 matrices (norms as f32: the same values)."""
    import gguf

    mf = format.read(src)
    c, tok = mf.config, mf.meta["tokenizer"]
    if c["sliding_window"]:
        raise SystemExit("compare: sliding-window models have no llama-arch GGUF equivalent")
    nh, nkv, hd, hid, d = c["n_heads"], c["n_kv_heads"], c["head_dim"], c["hidden_dim"], c["dim"]
    theta = float(c.get("rope_theta") or 10000.0)
    tmp = out + ".part"
    w = gguf.GGUFWriter(tmp, "llama")
    w.add_name(str(c.get("name") or os.path.basename(src)))
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    w.add_context_length(c["max_seq_len"])
    w.add_embedding_length(d)
    w.add_block_count(c["n_layers"])
    w.add_feed_forward_length(hid)
    w.add_head_count(nh)
    w.add_head_count_kv(nkv)
    w.add_key_length(hd)
    w.add_value_length(hd)
    w.add_rope_dimension_count(hd)
    w.add_rope_freq_base(theta)
    w.add_layer_norm_rms_eps(c["norm_eps"])
    w.add_vocab_size(c["vocab_size"])
    w.add_tokenizer_model(tok.get("model", "gpt2"))
    w.add_tokenizer_pre(tok.get("pre", "default"))
    w.add_token_list(tok["tokens"])
    w.add_token_types(tok["token_type"])
    if tok.get("merges"):
        w.add_token_merges(tok["merges"])
    if tok.get("scores"):
        w.add_token_scores(tok["scores"])
    for k, fn in (
        ("bos_token_id", w.add_bos_token_id),
        ("eos_token_id", w.add_eos_token_id),
        ("unknown_token_id", w.add_unk_token_id),
        ("padding_token_id", w.add_pad_token_id),
    ):
        if isinstance(tok.get(k), int):
            fn(tok[k])
    if "add_bos_token" in tok:
        w.add_add_bos_token(bool(tok["add_bos_token"]))
    if mf.meta.get("chat_template"):
        w.add_chat_template(mf.meta["chat_template"])

    def f16(name):
        return lambda: np.asarray(mf.matrix(name), dtype=np.float16)

    def f32(name):
        return lambda: np.asarray(mf.matrix(name), dtype=np.float32)

    def part(load, i, splits, permute=None):  # rows [splits[i], splits[i + 1]) of a fused matrix
        def rows():
            a = np.ascontiguousarray(load()[splits[i] : splits[i + 1]])
            return np.ascontiguousarray(hf_to_gguf_rows(a, permute)) if permute else a

        return rows

    # (name, loader, shape, dtype): the tensors are listed first and written one at a time
    # after the header, so the writer holds one tensor at a time (a 3B model streams too)
    tensors = [("token_embd.weight", f16("tok_embd"), (c["vocab_size"], d), np.float16)]
    # llama.cpp computes the frequencies from freq_base; a rope_freqs tensor divides them
    ours = np.asarray(mf.matrix("rope_freqs"), dtype=np.float32)
    base = 1.0 / theta ** (np.arange(0, hd, 2, dtype=np.float64) / hd)
    factors = (base / ours).astype(np.float32)
    if np.abs(factors - 1).max() > 1e-6:
        tensors.append(("rope_freqs.weight", lambda: factors, factors.shape, np.float32))
    qs = [0, nh * hd, (nh + nkv) * hd, (nh + 2 * nkv) * hd]
    for i in range(c["n_layers"]):
        p = g = f"blk.{i}."
        qkv = f16(p + "attn_qkv")
        tensors += [
            (g + "attn_norm.weight", f32(p + "attn_norm"), (d,), np.float32),
            (g + "attn_q.weight", part(qkv, 0, qs, nh), (nh * hd, d), np.float16),
            (g + "attn_k.weight", part(qkv, 1, qs, nkv), (nkv * hd, d), np.float16),
            (g + "attn_v.weight", part(qkv, 2, qs), (nkv * hd, d), np.float16),
        ]
        if c["flags"] & format.FLAG_QKV_BIAS:
            b = f32(p + "attn_qkv_bias")
            tensors += [
                (g + "attn_q.bias", part(b, 0, qs, nh), (nh * hd,), np.float32),
                (g + "attn_k.bias", part(b, 1, qs, nkv), (nkv * hd,), np.float32),
                (g + "attn_v.bias", part(b, 2, qs), (nkv * hd,), np.float32),
            ]
        gu = f16(p + "ffn_gate_up")
        tensors += [
            (g + "attn_output.weight", f16(p + "attn_out"), (d, nh * hd), np.float16),
            (g + "ffn_norm.weight", f32(p + "ffn_norm"), (d,), np.float32),
            (g + "ffn_gate.weight", part(gu, 0, [0, hid, 2 * hid]), (hid, d), np.float16),
            (g + "ffn_up.weight", part(gu, 1, [0, hid, 2 * hid]), (hid, d), np.float16),
            (g + "ffn_down.weight", f16(p + "ffn_down"), (d, hid), np.float16),
        ]
    tensors.append(("output_norm.weight", f32("output_norm"), (d,), np.float32))
    if not c["flags"] & format.FLAG_TIED_OUTPUT:
        tensors.append(("output.weight", f16("output"), (c["vocab_size"], d), np.float16))
    for name, _, shape, dtype in tensors:
        w.add_tensor_info(
            name, shape, np.dtype(dtype), int(np.prod(shape)) * np.dtype(dtype).itemsize
        )
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    for name, load, shape, dtype in tensors:
        a = load()
        if a.shape != tuple(shape) or a.dtype != dtype:
            raise SystemExit(
                f"compare: {name}: {a.dtype}{a.shape}, expected {np.dtype(dtype)}{tuple(shape)}"
            )
        w.write_tensor_data(a)
    w.close()
    os.replace(tmp, out)


def ensure_gguf(src, out):
    if not os.path.exists(out) or os.path.getmtime(out) < os.path.getmtime(src):
        print(f"writing {out} (F16 GGUF of {src}) ...", file=sys.stderr, flush=True)
        write_gguf(src, out)
    return out


# ---------------- engines (run inside worker processes) ----------------
class PyllmEngine:
    name = "pyllm"

    def __init__(self, a):
        self.r = bench.Runner(a.model, a.threads, a.n_ctx, a.max_depth)
        self.load_s = self.r.load_s
        from pyllm._pyllm import ffi, lib

        self.info = {
            "version": __import__("pyllm").__version__,
            "simd": ffi.string(lib.pyllm_simd()).decode(),
            **bench.build_info(),
        }

    def run(self, test, n=None):
        return self.r.run(test, n)

    def logits(self, ids):
        return self.r.logits(ids)


class LlamaCppEngine:
    name = "llama.cpp"

    def __init__(self, a, repack=True):
        import ctypes

        import llama_cpp as L

        self.L = L
        self._log_cb = L.llama_log_callback(lambda level, text, user: None)  # keep a reference
        L.llama_log_set(self._log_cb, ctypes.c_void_p(0))
        L.llama_backend_init()
        t0 = time.perf_counter()
        mp = L.llama_model_default_params()
        mp.n_gpu_layers = 0
        mp.use_mmap = True
        mp.use_extra_bufts = repack
        self.model = L.llama_model_load_from_file(a.gguf.encode(), mp)
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {a.gguf}")
        cp = L.llama_context_default_params()
        cp.n_ctx = a.n_ctx
        cp.n_batch = 2048  # llama-bench's defaults
        cp.n_ubatch = 512
        cp.n_threads = a.threads
        cp.n_threads_batch = a.threads
        cp.no_perf = True
        self.ctx = L.llama_init_from_model(self.model, cp)
        if not self.ctx:
            raise RuntimeError("llama.cpp could not create a context")
        self.mem = L.llama_get_memory(self.ctx)
        self.vocab = L.llama_vocab_n_tokens(L.llama_model_get_vocab(self.model))
        self.rng = np.random.default_rng(1234)
        self._decode([int(self.rng.integers(self.vocab))])  # first touch
        L.llama_memory_clear(self.mem, True)
        self.load_s = time.perf_counter() - t0
        self.depth_ids = self.rng.integers(0, self.vocab, max(a.max_depth, 1)).tolist()
        self.filled = 0
        desc = ctypes.create_string_buffer(256)
        L.llama_model_desc(self.model, desc, 256)
        self.info = {
            "version": getattr(L, "__version__", "?"),
            "desc": desc.value.decode(),
            "system_info": L.llama_print_system_info().decode().strip(),
            "repack": repack,
            "flash_attn_type": cp.flash_attn_type,
            "n_ctx": L.llama_n_ctx(self.ctx),
        }

    def _decode(self, ids, n_batch=2048):
        L = self.L
        for i in range(0, len(ids), n_batch):
            chunk = ids[i : i + n_batch]
            arr = (L.llama_token * len(chunk))(*chunk)
            rc = L.llama_decode(self.ctx, L.llama_batch_get_one(arr, len(chunk)))
            if rc:
                raise RuntimeError(f"llama_decode returned {rc}")
        L.llama_synchronize(self.ctx)

    def _cut(self, pos):  # forget positions >= pos
        self.L.llama_memory_seq_rm(self.mem, 0, pos, -1)

    def run(self, test, n=None):
        L, n = self.L, test.n if n is None else n
        self._cut(min(self.filled, test.depth))
        if self.filled < test.depth:
            self._decode(self.depth_ids[self.filled : test.depth])
        self.filled = max(self.filled, test.depth)
        ids = self.rng.integers(0, self.vocab, n).tolist()
        if test.kind == "pp":
            arr = (L.llama_token * n)(*ids)
            t0 = time.perf_counter_ns()
            for i in range(0, n, 2048):  # one llama_decode per n_batch, as llama-bench
                m = min(2048, n - i)
                rc = L.llama_decode(self.ctx, L.llama_batch_get_one(ctypes_ptr(L, arr, i), m))
                if rc:
                    raise RuntimeError(f"llama_decode returned {rc}")
            L.llama_synchronize(self.ctx)
            dt = time.perf_counter_ns() - t0
        else:
            arrs = [(L.llama_token * 1)(i) for i in ids]
            batches = [L.llama_batch_get_one(x, 1) for x in arrs]
            decode, sync, ctx = L.llama_decode, L.llama_synchronize, self.ctx
            t0 = time.perf_counter_ns()
            for b in batches:
                if decode(ctx, b):
                    raise RuntimeError("llama_decode failed")
                sync(ctx)
            dt = time.perf_counter_ns() - t0
        self._cut(test.depth)
        return dt

    def logits(self, ids):
        L = self.L
        L.llama_memory_clear(self.mem, True)
        self.filled = 0
        arr = (L.llama_token * len(ids))(*ids)
        if L.llama_decode(self.ctx, L.llama_batch_get_one(arr, len(ids))):
            raise RuntimeError("llama_decode failed")
        L.llama_synchronize(self.ctx)
        p = L.llama_get_logits_ith(self.ctx, -1)
        out = np.ctypeslib.as_array(p, shape=(self.vocab,)).astype(np.float32)
        L.llama_memory_clear(self.mem, True)
        return out


def ctypes_ptr(L, arr, offset):
    """A pointer to arr[offset:] typed as llama_token array, for llama_batch_get_one."""
    import ctypes

    n = len(arr) - offset
    return (L.llama_token * n).from_address(
        ctypes.addressof(arr) + offset * ctypes.sizeof(L.llama_token)
    )


def hf_model(path, dtype):
    """transformers' LlamaForCausalLM with exactly the file's weights (f32), then cast."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    mf = format.read(path)
    c = mf.config
    nh, nkv, hd, hid = c["n_heads"], c["n_kv_heads"], c["head_dim"], c["hidden_dim"]
    tied = bool(c["flags"] & format.FLAG_TIED_OUTPUT)
    bias = bool(c["flags"] & format.FLAG_QKV_BIAS)
    theta = float(c.get("rope_theta") or 10000.0)
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
        rope_parameters={"rope_type": "default", "rope_theta": theta},
        tie_word_embeddings=tied,
        attention_bias=bias,
        mlp_bias=False,
        hidden_act="silu",
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )
    cfg._attn_implementation = "sdpa"
    model = LlamaForCausalLM(cfg)

    def w(name):
        return torch.from_numpy(np.asarray(mf.matrix(name), dtype=np.float32))

    sd = {"model.embed_tokens.weight": w("tok_embd"), "model.norm.weight": w("output_norm")}
    if not tied:
        sd["lm_head.weight"] = w("output")
    for i in range(c["n_layers"]):
        p, q = f"blk.{i}.", f"model.layers.{i}."
        a = q + "self_attn."
        sd[a + "q_proj.weight"], sd[a + "k_proj.weight"], sd[a + "v_proj.weight"] = w(
            p + "attn_qkv"
        ).split([nh * hd, nkv * hd, nkv * hd])
        if bias:
            sd[a + "q_proj.bias"], sd[a + "k_proj.bias"], sd[a + "v_proj.bias"] = w(
                p + "attn_qkv_bias"
            ).split([nh * hd, nkv * hd, nkv * hd])
        sd[a + "o_proj.weight"] = w(p + "attn_out")
        sd[q + "mlp.gate_proj.weight"], sd[q + "mlp.up_proj.weight"] = w(p + "ffn_gate_up").split(
            [hid, hid]
        )
        sd[q + "mlp.down_proj.weight"] = w(p + "ffn_down")
        sd[q + "input_layernorm.weight"] = w(p + "attn_norm")
        sd[q + "post_attention_layernorm.weight"] = w(p + "ffn_norm")
    missing, unexpected = model.load_state_dict(
        {k: v.contiguous() for k, v in sd.items()}, strict=False
    )
    missing = [k for k in missing if not (tied and k == "lm_head.weight")]
    assert not missing and not unexpected, (missing, unexpected)
    if tied:
        model.tie_weights()
    rot = model.model.rotary_emb
    rot.inv_freq.copy_(torch.from_numpy(np.asarray(mf.tensors["rope_freqs"], dtype=np.float32)))
    rot.original_inv_freq = rot.inv_freq.clone()
    return model.to(dtype).eval()


class HFEngine:
    def __init__(self, a, dtype_name):
        import torch
        import transformers
        from transformers import DynamicCache

        self.torch, self.DynamicCache = torch, DynamicCache
        torch.set_num_threads(a.threads)
        t0 = time.perf_counter()
        self.model = hf_model(a.model, getattr(torch, dtype_name))
        self.vocab = self.model.config.vocab_size
        with torch.inference_mode():
            self.model(torch.tensor([[1]]), use_cache=False, logits_to_keep=1)  # first touch
        self.load_s = time.perf_counter() - t0
        self.name = "hf-" + {"float32": "f32", "bfloat16": "bf16"}[dtype_name]
        self.rng = np.random.default_rng(1234)
        self.depth_ids = self.rng.integers(0, self.vocab, max(a.max_depth, 1)).tolist()
        self.cache, self.filled = DynamicCache(), 0
        self.info = {
            "transformers": transformers.__version__,
            "torch": torch.__version__,
            "dtype": dtype_name,
            "attn": "sdpa",
        }

    def run(self, test, n=None):
        torch, n = self.torch, test.n if n is None else n
        with torch.inference_mode():
            if self.filled < test.depth:
                self._cut(self.filled)
                self.model(
                    torch.tensor([self.depth_ids[self.filled : test.depth]]),
                    past_key_values=self.cache,
                    use_cache=True,
                    logits_to_keep=1,
                )
                self.filled = test.depth
            self._cut(test.depth)
            ids = torch.tensor([self.rng.integers(0, self.vocab, n).tolist()])
            model, cache = self.model, self.cache
            if test.kind == "pp":
                t0 = time.perf_counter_ns()
                model(ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
                dt = time.perf_counter_ns() - t0
            else:
                toks = [ids[:, i : i + 1] for i in range(n)]
                t0 = time.perf_counter_ns()
                for x in toks:
                    model(x, past_key_values=cache, use_cache=True, logits_to_keep=1)
                dt = time.perf_counter_ns() - t0
            self._cut(test.depth)
        return dt

    def _cut(self, length):
        """Keep the first `length` positions (crop(-k) drops k: old and new transformers)."""
        extra = self.cache.get_seq_length() - length
        if extra > 0:
            self.cache.crop(-extra)

    def logits(self, ids):
        torch = self.torch
        with torch.inference_mode():
            out = self.model(torch.tensor([ids]), use_cache=False, logits_to_keep=1).logits[0, -1]
        return out.float().numpy().copy()


def make_engine(a):
    if a.worker == "pyllm":
        return PyllmEngine(a)
    if a.worker == "llama.cpp":
        return LlamaCppEngine(a)
    if a.worker == "llama.cpp-norepack":
        e = LlamaCppEngine(a, repack=False)
        e.name = "llama.cpp-norepack"
        return e
    if a.worker in ("hf-f32", "hf-bf16"):
        return HFEngine(a, "float32" if a.worker == "hf-f32" else "bfloat16")
    raise SystemExit(f"unknown engine {a.worker}")


def worker_main(a):
    """Serve commands, one JSON line each, on stdin; answer on the original stdout
    (fd 1 is pointed at stderr so library chatter cannot corrupt the protocol)."""
    out = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr

    def reply(**kw):
        out.write(json.dumps(kw) + "\n")

    try:
        e = make_engine(a)
    except Exception as ex:  # noqa: BLE001 - reported to the coordinator
        reply(ok=False, error=f"{type(ex).__name__}: {ex}")
        return 1
    reply(ok=True, load_s=e.load_s, info=e.info)
    for line in sys.stdin:
        cmd = json.loads(line)
        try:
            if cmd["cmd"] == "run":
                t = Test(cmd["kind"], cmd["n"], cmd["depth"])
                reply(ok=True, ns=e.run(t, cmd.get("n_override")))
            elif cmd["cmd"] == "logits":
                reply(
                    ok=True,
                    logits=base64.b64encode(e.logits(cmd["ids"]).astype("<f4").tobytes()).decode(),
                )
            elif cmd["cmd"] == "rss":
                reply(ok=True, peak_rss_bytes=bench.peak_rss_bytes())
            elif cmd["cmd"] == "quit":
                reply(ok=True)
                return 0
        except Exception as ex:  # noqa: BLE001
            reply(ok=False, error=f"{type(ex).__name__}: {ex}")
    return 0


# ---------------- the coordinator ----------------
class Worker:
    def __init__(self, engine, a, threads, n_ctx, max_depth):
        self.engine = engine
        self.log = os.path.join(
            tempfile.gettempdir(), f"pyllm-compare-{engine}-t{threads}-{os.getpid()}.log"
        )
        env = dict(
            os.environ,
            OMP_NUM_THREADS=str(threads),
            TOKENIZERS_PARALLELISM="false",
            HF_HUB_OFFLINE="1",
            TRANSFORMERS_OFFLINE="1",
        )
        self.p = subprocess.Popen(
            [
                sys.executable,
                os.path.abspath(__file__),
                "--worker",
                engine,
                a.model,
                "--gguf",
                a.gguf,
                "-t",
                str(threads),
                "--n-ctx",
                str(n_ctx),
                "--max-depth",
                str(max_depth),
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=open(self.log, "w"),
            text=True,
            env=env,
        )
        hello = self._read()
        self.load_s, self.info = hello["load_s"], hello["info"]

    def _read(self):
        line = self.p.stdout.readline()
        if not line:
            raise RuntimeError(f"{self.engine} worker died; its log: {self.log}\n" + self._tail())
        r = json.loads(line)
        if not r.get("ok"):
            raise RuntimeError(f"{self.engine}: {r.get('error')} (log: {self.log})")
        return r

    def _tail(self):
        try:
            with open(self.log) as f:
                return "".join(f.readlines()[-15:])
        except OSError:
            return ""

    def call(self, **cmd):
        self.p.stdin.write(json.dumps(cmd) + "\n")
        self.p.stdin.flush()
        return self._read()

    def run(self, test, n=None):
        return self.call(cmd="run", kind=test.kind, n=test.n, depth=test.depth, n_override=n)["ns"]

    def close(self):
        try:
            rss = self.call(cmd="rss")["peak_rss_bytes"]
            self.call(cmd="quit")
        finally:
            self.p.stdin.close()
            self.p.wait(timeout=60)
        return rss


def _busy_jiffies():
    """All CPUs' non-idle jiffies (/proc/stat), or None off Linux."""
    try:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        return sum(v[:3]) + sum(v[5:8])  # user nice system irq softirq steal
    except (OSError, ValueError):
        return None


def _proc_jiffies(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            v = f.read().rsplit(")", 1)[1].split()
        return int(v[11]) + int(v[12])  # utime stime (all threads)
    except (OSError, ValueError, IndexError):
        return None


def timed_run(w, test, cores):
    """w.run(test) and the share of the machine other processes used meanwhile (0..1)."""
    b0, p0, c0, t0 = (
        _busy_jiffies(),
        _proc_jiffies(w.p.pid),
        _proc_jiffies(os.getpid()),
        time.perf_counter(),
    )
    ns = w.run(test)
    b1, p1, c1, t1 = (
        _busy_jiffies(),
        _proc_jiffies(w.p.pid),
        _proc_jiffies(os.getpid()),
        time.perf_counter(),
    )
    if None in (b0, p0, c0, b1, p1, c1):
        return ns, None
    hz = os.sysconf("SC_CLK_TCK")
    other = ((b1 - b0) - (p1 - p0) - (c1 - c0)) / hz
    return ns, max(0.0, other / ((t1 - t0) * cores))


def other_load_now(cores, seconds=1.0):
    """The share of the machine used by processes outside this run over `seconds`
    (our workers are idle between runs), or None off Linux."""
    b0, t0 = _busy_jiffies(), time.perf_counter()
    time.sleep(seconds)
    b1, t1 = _busy_jiffies(), time.perf_counter()
    if b0 is None or b1 is None:
        return None
    return max(0.0, (b1 - b0) / os.sysconf("SC_CLK_TCK") / ((t1 - t0) * cores))


def wait_quiet(cores, threshold, max_wait):
    """Wait (at most max_wait s) until other processes use under `threshold` of the machine."""
    t_end = time.perf_counter() + max_wait
    said = False
    while True:
        load = other_load_now(cores)
        if load is None or load < threshold or time.perf_counter() > t_end:
            return load
        if not said:
            print(
                f"  (waiting for a quiet machine: other processes use {100 * load:.0f}%)",
                file=sys.stderr,
                flush=True,
            )
            said = True


def engine_available(name):
    import importlib.util

    mod = {
        "pyllm": "pyllm",
        "llama.cpp": "llama_cpp",
        "llama.cpp-norepack": "llama_cpp",
        "hf-f32": "transformers",
        "hf-bf16": "transformers",
    }[name]
    return importlib.util.find_spec(mod) is not None and (
        not name.startswith("hf") or importlib.util.find_spec("torch") is not None
    )


def check_logits(workers, vocab, n=CHECK_TOKENS, seed=7):
    ids = np.random.default_rng(seed).integers(0, vocab, n).tolist()
    got = {
        w.engine: np.frombuffer(base64.b64decode(w.call(cmd="logits", ids=ids)["logits"]), "<f4")
        for w in workers
    }
    ref = got["pyllm"]
    out = {}
    for name, lg in got.items():
        if name == "pyllm":
            continue
        top_ref, top = np.argsort(-ref)[:5], np.argsort(-lg)[:5]
        out[name] = {
            "max_abs_diff": float(np.abs(lg - ref).max()),
            "logit_scale": float(np.abs(ref).max()),
            "argmax_agree": bool(top_ref[0] == top[0]),
            "top5_overlap": len(set(top_ref) & set(top)),
        }
    return {"n_tokens": n, "vs_pyllm": out}


def fmt_ts(s):
    return f"{s['avg_ts']:.2f} ± {s['stddev_ts']:.2f}"


# ---------------- the plan: options, tests, engines ----------------
def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", nargs="?", default=DEFAULT_MODEL)
    ap.add_argument("-p", "--n-prompt", default="512")
    ap.add_argument("-n", "--n-gen", default="128")
    ap.add_argument("-d", "--n-depth", default="0", help="depths for every test (default 0)")
    ap.add_argument(
        "--decode-depths",
        default="512,2048,4096",
        help="extra tg tests at these depths, for the decode-vs-depth plot ('' = none)",
    )
    ap.add_argument(
        "-t", "--threads", default=None, help="thread counts (default: 1 and all cores)"
    )
    ap.add_argument("-r", "--repetitions", type=int, default=3)
    ap.add_argument(
        "--engines", default=DEFAULT_ENGINES, help=f"comma list of {', '.join(ALL_ENGINES)}"
    )
    ap.add_argument(
        "--gguf", default=None, help="the F16 GGUF (default: MODEL with .gguf, made if missing)"
    )
    ap.add_argument(
        "--gap", type=float, default=0.25, help="seconds of quiet between runs (default 0.25)"
    )
    ap.add_argument(
        "--max-other-load",
        type=float,
        default=0.1,
        help="before each timed run, wait until processes outside this run use less than this "
        "share of the machine, and redo a run they disturbed more (default 0.1; 1 = off)",
    )
    ap.add_argument(
        "--max-wait", type=float, default=600, help="seconds to wait for quiet (default 600)"
    )
    ap.add_argument("--retries", type=int, default=3, help="redos of a disturbed run (default 3)")
    ap.add_argument("--json-out", default=DEFAULT_JSON)
    ap.add_argument(
        "--no-roofline",
        dest="roofline",
        action="store_false",
        help="skip the ceilings (pyllm's fractions of the read and FMA ceilings) after the runs",
    )
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--n-ctx", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--max-depth", type=int, default=0, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.gguf is None:
        a.gguf = os.path.splitext(a.model)[0] + ".gguf"
    return a


def plan_tests(a):
    """-p and -n at every -d depth, then tg at each --decode-depths depth; by depth, since
    the engines' caches only grow."""
    depths = bench.int_list(a.n_depth, "-d")
    n_gen = bench.int_list(a.n_gen, "-n")
    tests = bench.make_tests(bench.int_list(a.n_prompt, "-p"), n_gen, depths)
    extra = bench.int_list(a.decode_depths, "--decode-depths") if a.decode_depths.strip() else []
    tests += [Test("tg", n, d) for d in extra if d not in depths for n in n_gen if n > 0]
    tests.sort(key=lambda t: t.depth)
    return tests


def select_engines(names):
    """The --engines that are installed, in order (pyllm required: ratios are pyllm/peer)."""
    engines = []
    for e in names.split(","):
        e = e.strip()
        if e not in ALL_ENGINES:
            raise SystemExit(
                f"compare: unknown engine {e!r} (choose from {', '.join(ALL_ENGINES)})"
            )
        if engine_available(e):
            engines.append(e)
        else:
            print(f"compare: {e} is not installed; skipped", file=sys.stderr)
    if "pyllm" not in engines:
        raise SystemExit("compare: pyllm must be one of the engines (ratios are pyllm/peer)")
    return engines


@dataclass
class Run:
    """One comparison: the options, the machine, what to run, and the record (doc, the JSON)."""

    a: argparse.Namespace
    cores: int
    threads: list
    tests: list
    engines: list
    info: bench.ModelInfo
    doc: dict = None

    @property
    def peers(self):
        return [e for e in self.engines if e != "pyllm"]

    @property
    def n_ctx(self):  # every test's context fits, and the logits check's
        return max([t.depth + t.n for t in self.tests] + [CHECK_TOKENS])

    @property
    def max_depth(self):
        return max(t.depth for t in self.tests)


def plan(a):
    cores = bench.default_threads()
    try:
        threads = bench.int_list(a.threads, "-t", lo=1) if a.threads else sorted({1, cores})
        tests = plan_tests(a)
    except ValueError as e:
        raise SystemExit(f"compare: {e}") from None
    engines = select_engines(a.engines)
    if any(e.startswith("llama.cpp") for e in engines):
        ensure_gguf(a.model, a.gguf)
    run = Run(a, cores, threads, tests, engines, bench.model_info(a.model))
    run.doc = new_doc(run)
    return run


def new_doc(run):
    a, info = run.a, run.info
    gguf = a.gguf if any(e.startswith("llama") for e in run.engines) else None
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "command": " ".join([os.path.relpath(sys.argv[0], ROOT)] + sys.argv[1:]),
        "machine": {
            "cpu": bench.cpu_info(),
            "cores": run.cores,
            "platform": platform.platform(),
            "python": platform.python_version(),
        },
        "model": {
            "file": a.model,
            "gguf": gguf,
            "type": info.desc,
            "size": info.size,
            "n_params": info.n_params,
            "weight_bytes_per_token": info.bytes_per_token,
        },
        "repetitions": a.repetitions,
        "engines": {},
        "loads": [],
        "check": None,
        "results": [],
    }


# ---------------- the runs: one thread count, one test ----------------
def run_threads(run, nt):
    """Every test at nt threads: start a worker per engine, check their logits (once per
    comparison), time the tests, close the workers."""
    workers = []
    try:
        for e in run.engines:
            print(f"[threads {nt}] loading {e} ...", file=sys.stderr, flush=True)
            workers.append(Worker(e, run.a, nt, run.n_ctx, run.max_depth))
            run.doc["engines"].setdefault(e, workers[-1].info)
        if run.doc["check"] is None:
            run.doc["check"] = check_logits(workers, run.info.config["vocab_size"])
            print_check(run.doc["check"])
        print("\n" + table_header(run.engines, run.peers), flush=True)
        for test in run.tests:
            print(time_test(run, workers, nt, test), flush=True)
    finally:
        close_workers(run, workers, nt)


def print_check(check):
    for name, c in check["vs_pyllm"].items():
        print(
            f"same-weights check, {name} vs pyllm, last-token logits of {check['n_tokens']} "
            f"random ids: max |diff| {c['max_abs_diff']:.3g} "
            f"(logits up to {c['logit_scale']:.1f}), "
            f"argmax {'agrees' if c['argmax_agree'] else 'DIFFERS'}, top-5 overlap "
            f"{c['top5_overlap']}/5",
            flush=True,
        )


def table_header(engines, peers):
    cells = ["threads", "test"] + [f"{e} t/s" for e in engines] + [f"pyllm/{e}" for e in peers]
    cells.append("other load")
    return "| " + " | ".join(cells) + " |\n|" + " ---: |" * len(cells)


def time_test(run, workers, nt, test):
    """One test on every engine: a warmup each (like llama-bench), then -r rounds, each
    running every engine once in turn (A/B/A/B..., rotating who goes first). Records the
    results in run.doc; returns the table row."""
    a = run.a
    print(f"[threads {nt}] {test.name}", file=sys.stderr, flush=True)
    for w in workers:
        w.run(test, 1 if test.kind == "tg" else None)
        time.sleep(a.gap)
    samples = {w.engine: [] for w in workers}
    other = {w.engine: [] for w in workers}
    for rep in range(a.repetitions):
        for k in range(len(workers)):
            w = workers[(rep + k) % len(workers)]
            ns, busy = quiet_run(w, test, a, run.cores)
            samples[w.engine].append(ns)
            if busy is not None:
                other[w.engine].append(busy)
            time.sleep(a.gap)
    return record_test(run, nt, test, samples, other)


def quiet_run(w, test, a, cores):
    """One timed run once other processes are quiet (--max-other-load), redone up to
    --retries times while they disturbed it; (ns, their share of the machine or None)."""
    for attempt in range(a.retries + 1):
        if a.max_other_load < 1:
            wait_quiet(cores, a.max_other_load, a.max_wait)
        ns, busy = timed_run(w, test, cores)
        if busy is None or busy <= a.max_other_load:
            break
        print(
            f"  ({w.engine}: other processes used {100 * busy:.0f}% during the run; "
            f"{'again' if attempt < a.retries else 'kept'})",
            file=sys.stderr,
            flush=True,
        )
    return ns, busy


def record_test(run, nt, test, samples, other):
    """Each engine's statistics into run.doc["results"]; the table row (t/s, pyllm/peer
    ratios, the most other processes used during any timed run)."""
    stats = {e: bench.summarize(s, test.n) for e, s in samples.items()}
    for e in stats:
        stats[e]["other_load"] = max(other[e]) if other[e] else None
    busiest = max((v for e in stats for v in other[e]), default=None)
    for e, s in stats.items():
        run.doc["results"].append(
            dict(
                engine=e,
                n_threads=nt,
                test=test.name,
                n_prompt=test.n_prompt,
                n_gen=test.n_gen,
                n_depth=test.depth,
                **s,
            )
        )
    cells = [str(nt), test.name] + [fmt_ts(stats[e]) for e in run.engines]
    cells += [f"{stats['pyllm']['avg_ts'] / stats[p]['avg_ts']:.2f}" for p in run.peers]
    cells.append("?" if busiest is None else f"{100 * busiest:.0f}%")
    return "| " + " | ".join(cells) + " |"


def close_workers(run, workers, nt):
    """Quit the workers; each one's load time and peak RSS (None if it failed) into run.doc."""
    for w in workers:
        try:
            rss = w.close()
        except Exception as ex:  # noqa: BLE001
            print(f"compare: closing {w.engine}: {ex}", file=sys.stderr)
            rss = None
        run.doc["loads"].append(
            {"engine": w.engine, "n_threads": nt, "load_s": w.load_s, "peak_rss_bytes": rss}
        )


# ---------------- the report ----------------
def print_loads(doc):
    print("\nload (open + first touch) and peak RSS per engine:")
    for r in doc["loads"]:
        rss = f"{r['peak_rss_bytes'] / 2**20:.0f} MiB" if r["peak_rss_bytes"] else "?"
        print(
            f"  {r['engine']:20} threads {r['n_threads']}: load {r['load_s']:.2f} s, peak RSS {rss}"
        )
    for e, i in doc["engines"].items():
        print(f"  {e}: " + ", ".join(f"{k}={v}" for k, v in i.items() if k != "system_info"))


def print_roofline(run):
    """The machine's ceilings (bench.ceilings, on pyllm's pool, after the runs) and pyllm's
    fraction of them: tg of the read ceiling, pp of the f32 FMA ceiling (run.doc["roofline"])."""
    ceil = {nt: bench.ceilings(run.a.model, nt) for nt in run.threads}
    rows = []
    for r in run.doc["results"]:
        if r["engine"] != "pyllm":
            continue
        res = bench.apply_roofline(
            {k: r[k] for k in ("n_prompt", "n_gen", "n_depth", "n_threads", "avg_ts")},
            run.info.config,
            run.info,
            ceil[r["n_threads"]],
        )
        rows.append(
            {
                "n_threads": r["n_threads"],
                "test": r["test"],
                **{
                    k: res[k]
                    for k in (
                        "roofline_bound",
                        "roofline_ts",
                        "roofline_fraction",
                        "roofline_warning",
                    )
                },
            }
        )
    run.doc["roofline"] = {"ceilings": {str(k): v for k, v in ceil.items()}, "pyllm": rows}
    print(
        "\nceilings, timed on pyllm's pool after the runs: "
        + "; ".join(
            f"{nt} thread{'s' if nt > 1 else ''}: read {c['read_gbs']:.1f} GB/s "
            f"({c['read_pattern']}), "
            f"f32 FMA {c['fma_gflops']:.0f} GFLOP/s"
            for nt, c in ceil.items()
        )
    )
    print("| threads | test | bound by | pyllm of its ceiling |\n| ---: | ---: | ---: | ---: |")
    for r in rows:
        frac = (
            f"{100 * r['roofline_fraction']:.0f}%"
            if r["roofline_fraction"] is not None
            else "probe low"
        )
        print(f"| {r['n_threads']} | {r['test']} | {r['roofline_bound']} | {frac} |")
    for r in rows:
        if r["roofline_warning"]:
            print("warning: " + r["roofline_warning"])


def write_json(doc, path):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(doc, f, indent=1)
    print(f"wrote {path}", file=sys.stderr)


def main(argv=None):
    a = parse_args(argv)
    if a.worker:
        a.threads = int(a.threads)
        return worker_main(a)
    run = plan(a)
    print(
        f"{run.info.desc}, {a.model}; {bench.cpu_info()}, {run.cores} cores; -r {a.repetitions}; "
        f"engines: {', '.join(run.engines)}",
        flush=True,
    )
    for nt in run.threads:
        run_threads(run, nt)
    print_loads(run.doc)
    if a.roofline:
        print_roofline(run)
    if a.json_out:
        write_json(run.doc, a.json_out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
