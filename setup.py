from setuptools import setup

setup(
    name="pyllm",
    version="0.1.0",
    description="A minimal offline LLM runtime: a flat f16 parameters file and a small C kernel",
    packages=["pyllm"],
    package_data={"pyllm": ["static/*.html"]},
    python_requires=">=3.9",
    setup_requires=["cffi>=1.15"],
    cffi_modules=["pyllm/_build.py:ffibuilder"],
    install_requires=[
        "cffi>=1.15",
        "numpy",
        "regex",
        "jinja2",
        "gguf",
        "safetensors",
        "tqdm",
        "starlette",
        "uvicorn",
    ],
    entry_points={"console_scripts": ["pyllm = pyllm.cli:main"]},
)
