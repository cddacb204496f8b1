"""cffi API-mode build of the C kernel (setup.py: cffi_modules)."""

import os
import platform
import re

from cffi import FFI

HERE = os.path.dirname(os.path.abspath(__file__))
CSRC = os.path.join(HERE, "..", "csrc")


def compile_args():
    # Local builds target the machine they run on (AVX-512/AVX2+F16C+FMA, NEON); set
    # PYLLM_ARCH to build for another target, e.g. PYLLM_ARCH=x86-64-v3 (AVX2) for a
    # portable x86 wheel, or PYLLM_ARCH=none for the plain scalar path.
    arch = os.environ.get("PYLLM_ARCH", "native")
    # -ffp-contract=off: FMAs only where the kernel writes them, so gcc and clang (which fuses
    # a * b + c by default) compute the same logits, bit for bit
    args = ["-std=c11", "-O3", "-Wall", "-Wextra", "-fno-math-errno", "-ffp-contract=off"]
    args += os.environ.get("PYLLM_CFLAGS", "").split()  # e.g. sanitizers for make test-asan
    if arch == "none":
        return args
    if platform.machine().lower() in ("arm64", "aarch64") and platform.system() == "Darwin":
        return args + (["-mcpu=native"] if arch == "native" else [f"-mcpu={arch}"])
    return args + [f"-march={arch}"]


ffibuilder = FFI()
with open(os.path.join(CSRC, "pyllm.h")) as f:
    ffibuilder.cdef(re.sub(r"/\*.*?\*/", "", f.read(), flags=re.S))
ffibuilder.set_source(
    "pyllm._pyllm",
    '#include "pyllm.h"',
    sources=[os.path.relpath(os.path.join(CSRC, f)) for f in ("pyllm.c", "bandwidth.c")],
    include_dirs=[CSRC],
    extra_compile_args=compile_args(),
    libraries=["m", "pthread"],
    extra_link_args=os.environ.get("PYLLM_CFLAGS", "").split(),
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
