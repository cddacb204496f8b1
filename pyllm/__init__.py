"""pyllm: a language model is two files, a flat f16 parameters file and a small C kernel."""
__version__ = "0.1.0"

import os as _os
import sys as _sys

if "numpy" not in _sys.modules:  # numpy's BLAS threads would spin against the kernel's own pool;
    for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS"):  # pyllm's numpy work is vector-sized
        _os.environ.setdefault(_var, "1")

from .model import Model, PyllmError, _native_open, load  # noqa: E402,F401
