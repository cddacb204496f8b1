"""pyllm: a language model is two files, a flat f16 parameters file and a small C kernel."""

__version__ = "0.1.0"

import os as _os
import sys as _sys

# numpy's OpenBLAS threads would spin against the kernel's pool, and pyllm's numpy work is
# vector-sized. Only OpenBLAS's own variable: OMP_NUM_THREADS would also pin torch & co.
if "numpy" not in _sys.modules:
    _os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

from .model import Model, PyllmError, _native_open, load  # noqa: E402,F401
