"""The command line's structure: imports flow one way (cli -> commands -> args), nothing
imports cli, and each command's options carry its own defaults (no argparse internals)."""
import ast
import os
import subprocess
import sys

import pytest

from pyllm import args, cli, perplexity

PKG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "pyllm")


def pyllm_imports(path):
    """The pyllm modules a source file imports, as dotted names ('pyllm.cli', ...)."""
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), path)
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "pyllm"}
        elif isinstance(node, ast.ImportFrom):
            base = "pyllm" if node.level else node.module or ""
            if node.level and node.module:
                base += "." + node.module
            elif not node.level and base.split(".")[0] != "pyllm":
                continue
            found.add(base)
            found |= {f"{base}.{a.name}" for a in node.names}  # from . import cli
    return found


def modules():
    return sorted(n for n in os.listdir(PKG) if n.endswith(".py"))


def test_the_import_graph_is_read():
    assert "pyllm.args" in pyllm_imports(os.path.join(PKG, "chat.py"))
    assert {"pyllm.chat", "pyllm.bench", "pyllm.perplexity"} <= pyllm_imports(os.path.join(PKG, "cli.py"))


@pytest.mark.parametrize("name", modules())
def test_nothing_imports_cli(name):
    if name in ("cli.py", "__main__.py"):  # cli itself; `python -m pyllm` runs cli.main
        return
    assert "pyllm.cli" not in pyllm_imports(os.path.join(PKG, name))


def test_args_imports_nothing_of_pyllm():
    assert pyllm_imports(os.path.join(PKG, "args.py")) == set()


def test_commands_import_without_cli():
    code = ("import sys; import pyllm.chat, pyllm.bench, pyllm.perplexity, pyllm.args; "
            "bad = [m for m in sys.modules if m == 'pyllm.cli']; print(bad); sys.exit(bool(bad))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_no_argparse_internals():
    for name in modules():
        with open(os.path.join(PKG, name), encoding="utf-8") as f:
            assert "_actions" not in f.read(), name


def test_each_command_its_own_defaults():
    p = cli.build_parser()
    ppl = p.parse_args(["perplexity", "m.bin", "t.txt"])
    assert ppl.ctx_size == perplexity.DEFAULT_CTX == 512 and ppl.threads is None
    gen = p.parse_args(["generate", "m.bin", "hi"])
    assert gen.ctx_size is None and gen.n_predict == 256 and gen.temp == 0.8
    chat = p.parse_args(["chat"])
    assert chat.model == args.DEFAULT_MODEL and chat.n_predict == -1 and chat.ctx_size is None
    assert p.parse_args(["chat", "-n", "7", "-c", "64"]).n_predict == 7


def test_help_says_the_defaults(capsys):
    for argv, said in ((["perplexity", "-h"], "(default 512)"), (["chat", "-h"], "default -1"),
                       (["generate", "-h"], "tokens to generate (default 256)")):
        with pytest.raises(SystemExit):
            cli.build_parser().parse_args(argv)
        assert said in " ".join(capsys.readouterr().out.split()), argv


def test_text_arg():
    assert args.text_arg("héllo", "prompt") == "héllo"
    with pytest.raises(args.UsageError, match="the prompt is not valid UTF-8"):
        args.text_arg("a\udcff", "prompt")


def test_bench_stays_off_the_private_binding():
    with open(os.path.join(PKG, "bench.py"), encoding="utf-8") as f:
        tree = ast.parse(f.read())
    attrs = {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)}
    assert "_m" not in attrs and "pyllm_forward" not in attrs
