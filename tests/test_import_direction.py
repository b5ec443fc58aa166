"""Dependencies point one way: the CLI -> recipes -> components -> the data contract, and the toy world is a
plug-in that generic code never imports.

The layer of a module is fixed by its path:

    schemas/*              the data contract    imports nothing of ours outside schemas/
    pipeline/* (not cli)   components           never stages/*, never pipeline.cli
    stages/*               recipes              never pipeline.cli
    pipeline/cli.py        the command line     recipes (stages/*) only inside its commands, never at module level

The toy world is `pipeline/toy/*`, `pipeline/backends/toy.py` and `stages/toy_*.py`. Those modules may import
anything their layer allows; every other module of ours imports none of them, except the CLI inside its
commands (the `gdro toy ...` group) and the modules named in `BORROWS_FROM_TOY`, each with its reason. Generic
code reaches the toy world only through its registries: the backend registry and the reward registry name their
built-in plug-in modules as strings and import them with `importlib` (this test does not follow those), so the
plug-in depends on the registry and never the registry on the plug-in.

Every import counts: `import x` and `from x import y`, at module level or inside a function (only the CLI's
recipe rule looks at the level), relative imports resolved against the importing module's package.
"""
from __future__ import annotations

import ast
import shutil
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OURS = ("schemas", "pipeline", "stages")
CLI = "pipeline.cli"

# Generic modules allowed to import the toy world, and why. Keep it short; an entry no longer needed fails.
BORROWS_FROM_TOY: dict[str, str] = {
    "pipeline.rewards.geneval": "GenEval's rules (`judge`, `Detection`) are implemented once, in the toy "
                                "world's verifier, and applied here to a plug-in detector's boxes",
}


def module_name(path: Path, root: Path) -> tuple[str, bool]:
    """(dotted name, is a package) of a source file under `root`."""
    parts = path.relative_to(root).with_suffix("").parts
    if parts[-1] == "__init__":
        return ".".join(parts[:-1]), True
    return ".".join(parts), False


def imports_of(name: str, source: str, *, is_package: bool = False) -> list[tuple[str, int, bool]]:
    """(imported module, line, at module level) for every import of `source`, relative ones resolved; for
    `from m import a` both `m` and `m.a` (a may be a submodule)."""
    tree = ast.parse(source)
    top = {id(node) for node in tree.body}
    for node in tree.body:  # imports under a module-level `if`/`try` run at import time too
        if isinstance(node, (ast.If, ast.Try)):
            top |= {id(n) for n in ast.walk(node) if isinstance(n, (ast.Import, ast.ImportFrom))}
    package = name if is_package else name.rpartition(".")[0]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            targets = [mod] + [f"{mod}.{a.name}" for a in node.names if a.name != "*"]
        else:
            continue
        out += [(t, node.lineno, id(node) in top) for t in targets]
    return out


def _within(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def is_toy(name: str) -> bool:
    return (_within(name, "pipeline.toy") or _within(name, "pipeline.backends.toy")
            or name.startswith("stages.toy_"))


def layer(name: str) -> str:
    if _within(name, CLI):
        return "cli"
    return {"schemas": "schemas", "pipeline": "components", "stages": "recipes"}[name.split(".")[0]]


def violations(modules: dict[str, tuple[str, bool]], borrows: dict[str, str] | None = None) -> list[str]:
    """Every back-pointing import of `modules` ({name: (source, is_package)}), one line each."""
    borrows = BORROWS_FROM_TOY if borrows is None else borrows
    bad = []
    for name, (source, is_package) in sorted(modules.items()):
        here = layer(name)
        reported = set()  # one line per import statement
        for target, line, top in imports_of(name, source, is_package=is_package):
            if target.split(".")[0] not in OURS or _within(target, name) or line in reported:
                continue
            there = layer(target)
            why = None
            if here == "schemas" and there != "schemas":
                why = "the data contract imports nothing of ours outside schemas/"
            elif here == "components" and there in ("recipes", "cli"):
                why = "a component imports a recipe or the CLI"
            elif here == "recipes" and there == "cli":
                why = "a recipe imports the CLI"
            elif here == "cli" and there == "recipes" and top:
                why = "the CLI imports a recipe at module level (import it inside the command)"
            elif is_toy(target) and not is_toy(name) and here != "cli" and name not in borrows:
                why = "generic code imports the toy world (reach it through a registry)"
            if why:
                reported.add(line)
                bad.append(f"{name}:{line} imports {target}: {why}")
    return bad


def our_modules(root: Path = ROOT) -> dict[str, tuple[str, bool]]:
    out = {}
    for top in OURS:
        for path in sorted((root / top).rglob("*.py")):
            name, is_package = module_name(path, root)
            out[name] = (path.read_text(), is_package)
    return out


# ------------------------------------------------------------------------------------------------ the tests
def test_every_import_points_down():
    assert violations(our_modules()) == []


def test_every_borrow_from_the_toy_world_is_still_needed():
    modules = our_modules()
    for name in BORROWS_FROM_TOY:
        source, is_package = modules[name]
        assert any(is_toy(t) for t, _, _ in imports_of(name, source, is_package=is_package)), \
            f"{name} no longer imports the toy world: drop it from BORROWS_FROM_TOY"


def _one(name: str, source: str, is_package: bool = False) -> list[str]:
    return violations({name: (source, is_package)}, borrows={})


def test_the_checker_catches_each_kind_of_back_pointing_import():
    assert _one("pipeline.losses", "from stages.train import main\n")  # component -> recipe
    assert _one("pipeline.flow", "def f():\n    from . import cli\n")  # component -> CLI, inside a function
    assert _one("schemas.layout", "from pipeline.errors import GdroError\n")  # contract -> component
    assert _one("schemas.records", "import stages.rollouts\n")
    assert _one("stages.train", "from pipeline.cli import main\n")  # recipe -> CLI
    assert _one("pipeline.cli", "from stages.train import main\n")  # CLI -> recipe at module level
    assert _one("pipeline.cli", "try:\n    import stages.train\nexcept ImportError:\n    pass\n")
    assert _one("pipeline.eval.report", "from ..toy.scoring import kind_table\n")  # generic -> toy, relative
    assert _one("stages.evaluate", "def f():\n    import pipeline.backends.toy\n")
    assert _one("pipeline.rewards", "from ..toy import verifier\n", is_package=True)
    assert _one("pipeline.rewards.geneval", "from ..toy.verifier import judge\n")  # no borrow granted


def test_the_checker_lets_the_allowed_arrows_through():
    assert _one("pipeline.cli", "def train():\n    from stages.train import main\n    from .toy import grid\n") == []
    assert _one("stages.train", "from pipeline.losses import group_loss\nfrom schemas import layout\n") == []
    assert _one("stages.bench", "from stages import train\n") == []  # a recipe may run another
    assert _one("stages.toy_pretrain", "from pipeline.toy.world import render\n") == []
    assert _one("pipeline.backends.toy", "from ..toy.world import SIZE\nfrom .base import Conditioning\n") == []
    assert _one("pipeline.toy.grid", "from ..sampling import sample\n") == []
    assert _one("schemas.manifest", "from . import layout\nimport json\n") == []
    assert _one("pipeline.rewards", "import importlib\nimportlib.import_module('pipeline.toy.rewards')\n",
                is_package=True) == []


def test_a_back_pointing_module_added_to_a_copy_of_the_tree_fails(tmp_path):
    for top in OURS:
        shutil.copytree(ROOT / top, tmp_path / top, ignore=shutil.ignore_patterns("__pycache__"))
    assert violations(our_modules(tmp_path)) == []
    (tmp_path / "pipeline" / "shortcut.py").write_text(
        '"""A component that reaches up."""\n\n\ndef run(cfg):\n    from stages.train import main\n\n'
        '    return main(cfg)\n')
    (tmp_path / "schemas" / "codec.py").write_text((ROOT / "schemas" / "codec.py").read_text()
                                                   + "\nfrom pipeline.errors import GdroError  # noqa\n")
    found = violations(our_modules(tmp_path))
    assert len(found) == 2
    assert found[0].startswith("pipeline.shortcut:5 imports stages.train: a component imports a recipe")
    assert found[1].startswith("schemas.codec:") and "pipeline.errors" in found[1]
