"""The code's shape, checked: the library's stages import only from their own layer or below,
there are no import cycles, the library never imports the orchestration, and ruff is clean."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LIBRARY = ROOT / "so8t_core"

# so8t_core's layers, lowest first: a module may import its own layer or a lower one.
LAYERS = [
    {"errors", "refs", "storage", "constants", "metrics", "gguf_file", "llama_runtime", "chat_template"},
    {"source"},
    {"analysis", "plan"},
    {"quantize"},
    {"assemble"},
    {"validate"},
    {"publish"},
    {"export"},
    {"testing"},
]


def layer_of(module: str) -> int:
    """The layer of ``so8t_core.<first part>...``."""
    parts = module.split(".")
    if parts == ["so8t_core"]:
        return len(LAYERS)  # the front door re-exports everything
    for rank, names in enumerate(LAYERS):
        if parts[1] in names:
            return rank
    raise AssertionError(f"{module} is in no layer: add it to LAYERS")


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports(path: Path) -> set[str]:
    """Every module ``path`` imports, at the top or inside a function."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            assert node.level == 0, f"{path}: relative import (use so8t_core.…)"
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)  # a submodule imported by name
    return found


def library_modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(LIBRARY.rglob("*.py"))}


def test_every_library_module_imports_only_its_layer_or_below():
    modules = library_modules()
    upward = []
    for name, path in modules.items():
        if name == "so8t_core":
            continue
        for target in imports(path):
            if not target.startswith("so8t_core.") or target not in modules and \
                    target.rsplit(".", 1)[0] not in modules:
                continue
            target = target if target in modules else target.rsplit(".", 1)[0]
            if target == "so8t_core":
                upward.append(f"{name} imports the front door (import from the module itself)")
            elif layer_of(target) > layer_of(name):
                upward.append(f"{name} (layer {layer_of(name)}) imports {target} (layer {layer_of(target)})")
    assert not upward, "\n".join(upward)


def test_the_library_never_imports_the_orchestration():
    offenders = [f"{name}: {t}" for name, path in library_modules().items() for t in imports(path)
                 if t.split(".")[0] in ("prefect", "prefect_dask", "tasks", "flows")]
    assert not offenders, "\n".join(offenders)


def test_tasks_never_import_flows():
    offenders = [f"{p.name}: {t}" for p in sorted((ROOT / "tasks").glob("*.py")) for t in imports(p)
                 if t.split(".")[0] == "flows"]
    assert not offenders, "\n".join(offenders)


def test_no_import_cycles_at_module_level():
    """Top-level imports among library modules form no cycle (a function-level import may
    break one on purpose, but none is needed today)."""
    modules = library_modules()
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        edges = set()
        for node in ast.parse(path.read_text()).body:
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            edges.update(t for t in targets if t in modules and t != name)
        graph[name] = edges
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycle = path[path.index(nxt):] + [nxt] if nxt in path else [node, nxt]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])


def test_the_front_door_names_resolve():
    import so8t_core

    for name in so8t_core.__all__:
        assert getattr(so8t_core, name) is not None, name


def test_importing_the_library_is_instant():
    """``import so8t_core`` loads none of the heavy libraries (the CLI starts on it)."""
    code = ("import sys, so8t_core, so8t_core.errors; "
            "print(sorted(m for m in ('torch', 'transformers', 'prefect') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]"


@pytest.mark.skipif(shutil.which("ruff") is None and not (Path(sys.executable).parent / "ruff").exists(),
                    reason="ruff is installed with the test extras")
def test_ruff_is_clean():
    ruff = shutil.which("ruff") or str(Path(sys.executable).parent / "ruff")
    out = subprocess.run([ruff, "check", "so8t_core", "tasks", "flows", "tests", "benchmarks", "notebooks"],
                         capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stdout + out.stderr
