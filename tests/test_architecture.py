"""The package layout: imports flow one way between the subpackages, and no module is in a circle.

The graph is read from the source (every ``import`` statement, including the ones inside
functions and ``TYPE_CHECKING`` blocks, since a lazy import is still a dependency), and every
module is imported on its own in a fresh set of ``ffsd`` modules, so an import that only works
because another module happened to be imported first is found too.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "ffsd"

# Which neighbourhood may import which (README's "Architecture"). A neighbourhood is a
# subpackage or a top-level module of ffsd; "ffsd" is the package's own facade (__init__).
ALLOWED: dict[str, set[str]] = {
    "config": set(),
    "losses": set(),
    "schedules": set(),
    "models": set(),
    "data": {"config"},
    "methods": {"models", "losses", "schedules", "config"},
    "tracking": {"config"},
    "training": {"methods", "models", "data", "tracking", "config", "losses", "schedules"},
    "report": {"tracking", "config"},
    "tasks": {"training", "tracking", "methods", "models", "data", "config", "losses", "schedules"},
    "ffsd": {"methods", "training"},
}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imported(path: Path, name: str, known: set[str]) -> set[str]:
    """The ffsd modules that ``path`` (module ``name``) imports."""
    is_package = path.name == "__init__.py"
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = name.split(".") if is_package else name.split(".")[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            # ``from pkg import module`` depends on the module; ``from pkg import name``, on pkg.
            subs = [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in known]
            targets = subs if len(subs) == len(node.names) else [base, *subs]
        else:
            continue
        out.update(t for t in targets if t in known and t != name)
    return out


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {name: imported(path, name, set(mods)) for name, path in mods.items()}


def neighbourhood(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "ffsd"


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt) :], nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_every_neighbourhood_is_known():
    assert {neighbourhood(m) for m in modules()} == set(ALLOWED)


def test_imports_flow_one_way_between_neighbourhoods():
    wrong = [
        f"{src} imports {dst}"
        for src, dsts in graph().items()
        for dst in sorted(dsts)
        if neighbourhood(dst) != neighbourhood(src)
        and neighbourhood(dst) not in ALLOWED[neighbourhood(src)]
    ]
    assert not wrong, "imports against the layering:\n" + "\n".join(wrong)


def test_the_neighbourhood_graph_has_no_circle():
    edges: dict[str, set[str]] = {n: set() for n in ALLOWED}
    for src, dsts in graph().items():
        edges[neighbourhood(src)] |= {neighbourhood(d) for d in dsts} - {neighbourhood(src)}
    assert find_cycle(edges) is None, find_cycle(edges)
    assert find_cycle({n: set(a) for n, a in ALLOWED.items()}) is None


def test_no_module_is_in_an_import_circle():
    edges = graph()
    # A package's __init__ re-exporting its modules is not a circle with them.
    for name in edges:
        edges[name] = {d for d in edges[name] if not name.startswith(d + ".")}
    assert find_cycle(edges) is None, " -> ".join(find_cycle(edges) or [])


def test_the_cycle_finder_finds_a_circle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_every_subpackage_says_what_it_owns_and_may_import():
    for init in PACKAGE.glob("*/__init__.py"):
        doc = ast.get_docstring(ast.parse(init.read_text())) or ""
        assert "Owns" in doc, f"{init}: the docstring says what the package owns"
        assert "may import" in doc.lower(), f"{init}: the docstring says what it may import"


SCRIPT = """
import importlib, sys
failed = []
for name in sys.argv[1:]:
    for key in [k for k in sys.modules if k == "ffsd" or k.startswith("ffsd.")]:
        del sys.modules[key]
    try:
        importlib.import_module(name)
    except Exception as err:
        failed.append(f"{name}: {type(err).__name__}: {err}")
print("\\n".join(failed))
sys.exit(1 if failed else 0)
"""


def test_each_module_imports_on_its_own():
    names = sorted(n for n in modules() if not n.endswith("__main__"))
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, *names], cwd=ROOT, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("module", ["ffsd", "ffsd.report.summary", "ffsd.config"])
def test_light_modules_do_not_import_torch(module):
    # `python -m ffsd.report` runs where the store is, not where the GPUs are.
    code = f"import sys, {module}; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT).returncode == 0


def test_old_module_paths_are_gone():
    gone = [
        "method", "engine", "distributed", "preemption", "checkpoint", "runtime",
        "acceleration", "mlflow_tracking", "provenance", "hydra_callbacks", "evaluation",
        "export", "weights", "plots",
    ]  # fmt: skip
    assert not [n for n in gone if (PACKAGE / f"{n}.py").exists()]
    assert not (PACKAGE / "report.py").exists() and not (PACKAGE / "tasks.py").exists()
