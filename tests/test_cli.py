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
    """The pyllm modules a source file imports anywhere in it, as dotted names: `from .args
    import x` and `from . import args` are both 'pyllm.args'; `import pyllm` is 'pyllm'."""
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), path)
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "pyllm"}
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0 and (node.module or "").split(".")[0] != "pyllm":
                continue
            base = "pyllm" + (f".{node.module}" if node.level and node.module else "")
            base = node.module if node.level == 0 else base
            if base == "pyllm":  # from . import args, chat: the submodules
                found |= {f"pyllm.{a.name}" for a in node.names}
            else:
                found.add(base)
    return found


def modules():
    return sorted(n for n in os.listdir(PKG) if n.endswith(".py"))


def import_graph():
    """pyllm module -> the pyllm modules it imports ('pyllm' is __init__.py)."""
    graph = {}
    for name in modules():
        mod = "pyllm" if name == "__init__.py" else f"pyllm.{name[:-3]}"
        graph[mod] = pyllm_imports(os.path.join(PKG, name))
    return graph


def test_the_import_graph_is_read():
    g = import_graph()
    assert "pyllm.args" in g["pyllm.chat"] and "pyllm.model" in g["pyllm"]
    assert {"pyllm.chat", "pyllm.bench", "pyllm.perplexity", "pyllm.args"} <= g["pyllm.cli"]


def test_nothing_imports_cli():
    importers = [m for m, deps in import_graph().items() if "pyllm.cli" in deps]
    assert importers == ["pyllm.__main__"]  # `python -m pyllm` runs cli.main


def test_imports_flow_one_way():
    """No cycle among pyllm's modules, counting imports inside functions too."""
    graph = import_graph()
    state = {}  # module -> "open" while on the path, "done" after

    def visit(mod, path):
        if state.get(mod) == "open":
            raise AssertionError("import cycle: " + " -> ".join(path[path.index(mod) :] + [mod]))
        if state.get(mod) == "done":
            return
        state[mod] = "open"
        for dep in sorted(graph.get(mod, ())):
            visit(dep, path + [mod])
        state[mod] = "done"

    for mod in sorted(graph):
        visit(mod, [])


def test_args_imports_no_command():
    assert not import_graph()["pyllm.args"] & {
        "pyllm.cli",
        "pyllm.chat",
        "pyllm.bench",
        "pyllm.perplexity",
        "pyllm.convert",
    }


def test_commands_import_without_cli():
    code = (
        "import sys; import pyllm.chat, pyllm.bench, pyllm.perplexity, pyllm.args; "
        "bad = [m for m in sys.modules if m == 'pyllm.cli']; print(bad); sys.exit(bool(bad))"
    )
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
    for argv, said in (
        (["perplexity", "-h"], "(default 512)"),
        (["chat", "-h"], "default -1"),
        (["generate", "-h"], "tokens to generate (default 256)"),
    ):
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
