"""Hashes of the kernel's logits on fixed inputs, per compiled path:
tests/fixtures/logit_hashes.json.

test_kernel.py (and test_cross.py for NEON) recompute them and require equality, so a change
meant to keep the kernel's arithmetic (a refactor, a speed-up) proves it byte for byte.
Regenerate only when a change is meant to alter logits, for each path's build:

    python tests/make_logit_hashes.py --update                    # the installed build's path
    python tests/make_logit_hashes.py --kernel build/none --update   # a build under build/
    python tests/make_logit_hashes.py --neon --update             # cross-built, under qemu

A case is a model, ids, and the sizes of the forward calls that feed them (all positions'
logits, concatenated); each is run at 1 and 2 threads. The hash is sha256 of the float32 bytes.
"""

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
FIXTURE = os.path.join(HERE, "fixtures", "logit_hashes.json")
DEFAULT_MODEL = os.path.join(ROOT, "weights", "smollm2-135m-instruct.f16.bin")
THREADS = (1, 2)
CROSS_CC = os.environ.get("PYLLM_CROSS_CC", "aarch64-linux-gnu-gcc")
LONG = dict(max_seq_len=1024, n_kv_heads=1)  # past one 512-position attention segment


def cases():
    """name -> (tiny.py overrides or None for the default model, seed, chunk sizes)."""
    from tiny import VARIANTS

    out = {}
    for name, overrides in VARIANTS.items():
        out[f"{name}/prefill"] = (overrides, 300, (300,))  # three 128-token blocks
        out[f"{name}/decode"] = (
            overrides,
            301,
            (130, 1, 1, 37, 1),
        )  # decode after prefill, uneven chunks
    for window in (0, 8, 300):  # a block straddling position 512, decode in the second segment
        out[f"long_w{window}/segments"] = (
            dict(LONG, sliding_window=window),
            7,
            (500, 100, 1, 1, 298),
        )
    out["smollm2/decode"] = (None, 0, (40, 1, 1))
    return out


def model_path(name, overrides, seed, tmpdir):
    if overrides is None:
        return DEFAULT_MODEL if os.path.exists(DEFAULT_MODEL) else None
    from tiny import make_tiny_model

    path = os.path.join(tmpdir, name.replace("/", "_") + ".bin")
    make_tiny_model(path, seed=seed, **overrides)
    return path


def token_ids(path, seed, n):
    import numpy as np

    from pyllm import format

    vocab = format.read(path, map_tensors=False).config["vocab_size"]
    return [int(i) for i in np.random.default_rng(seed).integers(0, vocab, n)], vocab


def digest(logits):
    import numpy as np

    return hashlib.sha256(np.ascontiguousarray(logits, dtype=np.float32).tobytes()).hexdigest()


def run_python(path, ids, chunks, threads):
    """All positions' logits, fed in chunks through the compiled kernel."""
    import numpy as np

    import pyllm
    from pyllm._pyllm import ffi, lib

    vocab = format_vocab(path)
    m = pyllm._native_open(path, threads, 0)
    out = np.zeros((len(ids), vocab), np.float32)
    pos = 0
    for n in chunks:
        rc = lib.pyllm_forward(
            m,
            ffi.new("int[]", ids[pos : pos + n]),
            n,
            pos,
            ffi.cast("float *", ffi.from_buffer(out[pos:])),
            1,
        )
        assert rc == 0, rc
        pos += n
    return out


def format_vocab(path):
    from pyllm import format

    return format.read(path, map_tensors=False).config["vocab_size"]


def neon_exe(tmpdir, root=ROOT):
    """tests/kernel_main.c and the kernel cross-compiled for arm64 (run it under qemu-aarch64)."""
    exe = os.path.join(tmpdir, "kernel")
    sources = [
        os.path.join(root, "csrc", f)
        for f in sorted(os.listdir(os.path.join(root, "csrc")))
        if f.endswith(".c")
    ]
    subprocess.run(
        [
            CROSS_CC,
            "-std=c11",
            "-O2",
            "-ffp-contract=off",
            "-march=armv8.2-a",
            "-static",
            "-pthread",
            "-I",
            os.path.join(root, "csrc"),
            *sources,
            os.path.join(HERE, "kernel_main.c"),
            "-lm",
            "-o",
            exe,
        ],
        check=True,
    )
    return exe


def run_neon(exe, path, ids, chunks, threads, cache="f16"):
    import numpy as np

    vocab = format_vocab(path)
    out = subprocess.run(
        [
            "qemu-aarch64",
            exe,
            path,
            str(threads),
            cache,
            ",".join(map(str, chunks)),
            str(vocab),
            *map(str, ids),
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert out[0] == "neon", out[0]
    return np.array(out[1:], dtype=np.float32).reshape(len(ids), vocab)  # %.9g: exact for float32


def compute(run, tmpdir, only=None):
    """{"case@tN": hash} for every case whose model exists (the default model may be absent)."""
    hashes = {}
    for name, (overrides, seed, chunks) in cases().items():
        if only and not only(name):
            continue
        path = model_path(name, overrides, seed, tmpdir)
        if path is None:
            continue
        ids, _ = token_ids(path, seed, sum(chunks))
        for t in THREADS:
            hashes[f"{name}@t{t}"] = digest(run(path, ids, chunks, t))
    return hashes


def load_fixture():
    with open(FIXTURE) as f:
        return json.load(f)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--kernel", help="a directory holding a built pyllm package (default: the installed one)"
    )
    ap.add_argument(
        "--neon",
        action="store_true",
        help="the NEON path: cross-compile --root's kernel, run under qemu",
    )
    ap.add_argument("--root", default=ROOT, help="the source tree whose csrc/ --neon builds")
    ap.add_argument(
        "--update", action="store_true", help=f"store the hashes in {os.path.relpath(FIXTURE)}"
    )
    args = ap.parse_args()
    if args.kernel:
        sys.path.insert(0, os.path.abspath(args.kernel))
    with tempfile.TemporaryDirectory() as tmp:
        if args.neon:
            exe = neon_exe(tmp, args.root)
            key = "neon"
            hashes = compute(
                lambda *a: run_neon(exe, *a), tmp, only=lambda n: not n.startswith("smollm2")
            )
        else:
            import pyllm
            from pyllm._pyllm import ffi, lib

            print("kernel:", pyllm.__file__, file=sys.stderr)
            key = ffi.string(lib.pyllm_simd()).decode()
            hashes = compute(run_python, tmp)
    print(json.dumps({key: hashes}, indent=1))
    if args.update:
        fixture = load_fixture() if os.path.exists(FIXTURE) else {}
        fixture[key] = hashes
        with open(FIXTURE, "w") as f:
            json.dump(fixture, f, indent=1, sort_keys=True)
            f.write("\n")


if __name__ == "__main__":
    main()
