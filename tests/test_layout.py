"""The package layout shows the pipeline: every module belongs to a stage, imports only from its own stage
or an earlier one, the import graph has no cycle, and the run-folder writer is a leaf."""
from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "src" / "anatomy_prune"

# The stages in order; a module may import from its own stage or any stage before it.
STAGES = [
    ("leaves", ["errors", "safefiles", "runfolder", "resources", "validate", "linalg", "progress"]),
    ("models", ["models"]),
    ("data", ["data"]),
    ("hooks", ["hooks"]),
    ("train", ["train"]),
    ("anatomy", ["anatomy"]),
    ("scores", ["scores"]),
    ("plan", ["plan"]),
    ("apply", ["apply"]),
    ("evaluate", ["evaluate"]),
    ("export", ["export"]),
    ("plotting", ["plotting"]),
    ("pipeline", ["pipeline", "finepruning"]),
    ("entry points", ["demo", "notebook", "cli_args", "cli", "__main__", "__init__"]),
]


def module_name(path: Path) -> str:
    rel = path.relative_to(PKG).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__" and len(parts) > 1:
        parts = parts[:-1]
    return ".".join(parts)


def stage_of(module: str) -> int:
    top = module.split(".")[0]
    for i, (_name, tops) in enumerate(STAGES):
        if top in tops:
            return i
    raise AssertionError(f"module '{module}' belongs to no stage; add it to STAGES in tests/test_layout.py")


def imports_of(path: Path) -> set[str]:
    """Modules of the package that `path` imports (module-level and inside functions), as dotted names."""
    tree = ast.parse(path.read_text())
    here = module_name(path).split(".")
    package = here if path.name == "__init__.py" else here[:-1]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)] if node.level > 1 else package
                target = base + (node.module.split(".") if node.module else [])
                names = [target + [a.name] for a in node.names]
            elif node.module and node.module.startswith("anatomy_prune"):
                target = node.module.split(".")[1:]
                names = [target + [a.name] for a in node.names]
            else:
                continue
            for cand in names:  # `from .x import y`: y may be a submodule or a name inside x
                dotted = ".".join(cand)
                if (PKG / Path(*cand)).with_suffix(".py").is_file() or (PKG / Path(*cand) / "__init__.py").is_file():
                    found.add(dotted)
                elif target:
                    found.add(".".join(target))
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("anatomy_prune."):
                    found.add(a.name.split(".", 1)[1])
    return {f for f in found if f and f != module_name(path)}


def graph() -> dict[str, set[str]]:
    return {module_name(p): imports_of(p) for p in PKG.rglob("*.py")}


def test_every_module_imports_only_from_its_stage_or_earlier():
    bad = []
    for mod, deps in graph().items():
        for dep in deps:
            if stage_of(dep) > stage_of(mod):
                bad.append(f"{mod} ({STAGES[stage_of(mod)][0]}) imports {dep} ({STAGES[stage_of(dep)][0]})")
    assert not bad, "imports against the pipeline's direction:\n" + "\n".join(sorted(bad))


def find_cycles(g: dict[str, set[str]]) -> list[str]:
    state: dict[str, int] = {}
    cycles = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for dep in sorted(g.get(node, ())):
            if state.get(dep) == 1:
                cycles.append(" -> ".join(stack[stack.index(dep):] + [dep]))
            elif state.get(dep) is None and dep in g:
                visit(dep, stack + [dep])
        state[node] = 2

    for node in sorted(g):
        if state.get(node) is None:
            visit(node, [node])
    return cycles


def test_no_import_cycles():
    cycles = find_cycles(graph())
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_the_cycle_finder_finds_one():
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a -> b -> c -> a"]


def test_the_run_folder_writer_is_a_leaf():
    deps = imports_of(PKG / "runfolder.py")
    assert deps <= {"errors", "safefiles"}, deps
    text = (PKG / "runfolder.py").read_text()
    assert "import torch" not in text and "transformers" not in text


def test_the_checker_sees_a_violation(tmp_path, monkeypatch):
    """The stage check is not vacuous: a module of an early stage importing a late one is caught."""
    bad = PKG / "models" / "_layout_probe.py"
    try:
        bad.write_text("from ..pipeline.step import prune_step\n")
        offenders = [dep for dep in imports_of(bad) if stage_of(dep) > stage_of(module_name(bad))]
        assert offenders == ["pipeline.step"]
    finally:
        bad.unlink()


def test_no_module_is_a_room_with_many_jobs():
    """A newcomer can read any module: none is longer than 500 lines."""
    long = {module_name(p): n for p in PKG.rglob("*.py") if (n := len(p.read_text().splitlines())) > 500}
    assert not long, long
