"""pyllm: a language model is two files, a flat f16 parameters file and a small C kernel."""
__version__ = "0.1.0"

from .model import Model, PyllmError, _native_open, load  # noqa: E402,F401
