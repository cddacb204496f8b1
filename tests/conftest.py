import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_MODEL = os.path.join(ROOT, "weights", "smollm2-135m-instruct.f16.bin")
DEFAULT_GGUF = os.path.join(ROOT, "weights", "SmolLM2-135M-Instruct.Q4_1.gguf")


@pytest.fixture(scope="session")
def default_model():
    """The converted default model; a missing file is a failure, never a skip."""
    if not os.path.exists(DEFAULT_MODEL):
        pytest.fail(f"{DEFAULT_MODEL} is missing: run `make weights`")
    return DEFAULT_MODEL


@pytest.fixture(scope="session")
def default_gguf():
    if not os.path.exists(DEFAULT_GGUF):
        pytest.fail(f"{DEFAULT_GGUF} is missing: run `make weights`")
    return DEFAULT_GGUF
