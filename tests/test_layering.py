"""Imports run one way: tools -> train/evaluate/generate -> model core, with no import hidden in a function."""

import ast
import pathlib
import subprocess
import sys

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "tarflow_jax"
# Each layer may import only its own and lower layers (modules of ours, by file name).
LAYERS = [
    {"layers", "likelihood", "sharding", "fid", "xla_cpu"},
    {"sampling"},
    {"flow"},
    {"configlib", "convert"},
    {"distrax_compat", "nnx_compat", "trained"},
    {"workdir"},
    {"checkpointing", "__init__"},
    {"input_pipeline", "train_state"},
    {"evaluate", "generate"},
    {"train"},
    {"main"},
]
DEPRECATED_SHIMS = {"benchmark", "memory", "fid_cli"}  # forward to tools/ with a warning (memory: retired)
ENTRY_POINTS = {"aot"}  # `python -m tarflow_jax.aot`: the documented command of tools/aot.py


def our_imports(path: pathlib.Path) -> tuple[set[str], set[str]]:
    """``(top-level imports, imports inside functions)`` of ``tarflow_jax`` modules in one file."""
    top, inner = set(), set()

    def visit(node, in_function):
        for child in ast.iter_child_nodes(node):
            nested = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.ImportFrom) and child.module and child.module.startswith("tarflow_jax"):
                names = [child.module] if child.module != "tarflow_jax" else []
                names += [f"{child.module}.{a.name}" for a in child.names if child.module == "tarflow_jax"
                          or child.module == "tarflow_jax.tools"]
                (inner if nested else top).update(names)
            elif isinstance(child, ast.Import):
                (inner if nested else top).update(a.name for a in child.names if a.name.startswith("tarflow_jax"))
            visit(child, nested)

    visit(ast.parse(path.read_text()), False)
    return top, inner


def layer_of(module: str) -> int:
    for i, layer in enumerate(LAYERS):
        if module in layer:
            return i
    raise AssertionError(f"tarflow_jax.{module} has no layer in tests/test_layering.py: add it")


@pytest.mark.parametrize("path", sorted(p for p in PACKAGE.glob("*.py")), ids=lambda p: p.stem)
def test_library_imports_only_lower_layers(path):
    if path.stem in DEPRECATED_SHIMS | ENTRY_POINTS:
        return
    top, inner = our_imports(path)
    assert not inner, f"{path.name} imports {sorted(inner)} inside a function"
    mine = layer_of(path.stem)
    for name in top:
        parts = name.split(".")
        assert parts[1:2] != ["tools"], f"{path.name} imports the tools ({name})"
        other = parts[1] if len(parts) > 1 else "__init__"
        if not (PACKAGE / f"{other}.py").exists():
            continue  # a name from the package root, e.g. `from tarflow_jax import TarFlow`
        assert layer_of(other) <= mine, f"{path.name} (layer {mine}) imports {name} (layer {layer_of(other)})"


@pytest.mark.parametrize("path", sorted((PACKAGE / "tools").glob("*.py")), ids=lambda p: p.stem)
def test_tools_import_at_top_level(path):
    _, inner = our_imports(path)
    assert not inner, f"tools/{path.name} imports {sorted(inner)} inside a function"


ROOT = PACKAGE.parent


@pytest.mark.parametrize("old,new,args,expect", [
    ("convert", "tools.convert", ["--help"], "--torch_checkpoint"),
])
def test_old_entry_points_forward_with_a_warning(old, new, args, expect):
    result = subprocess.run([sys.executable, "-m", f"tarflow_jax.{old}", *args], cwd=ROOT, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert expect in result.stdout
    assert "FutureWarning" in result.stderr and f"tarflow_jax.{new}" in result.stderr


def test_old_module_attributes_forward_with_a_warning():
    import tarflow_jax.benchmark as old
    from tarflow_jax.tools import benchmark

    with pytest.warns(FutureWarning, match="tarflow_jax.tools.benchmark"):
        assert old.flop_counts is benchmark.flop_counts


def test_retired_memory_tool_points_to_the_dry_run():
    result = subprocess.run([sys.executable, "-m", "tarflow_jax.memory"], cwd=ROOT, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 2 and "python -m tarflow_jax.aot" in result.stderr
    with pytest.raises(ImportError, match="tarflow_jax.aot"):
        import tarflow_jax.memory  # noqa: F401
