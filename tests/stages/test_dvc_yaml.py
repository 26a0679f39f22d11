"""dvc.yaml against the code: every module a stage imports lies under one of its deps (a file, or
a layer's folder), so a change to shared code reruns the stages that run it, and no dep is code
the stage never runs."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
STAGES = yaml.safe_load((REPO_ROOT / "dvc.yaml").read_text())["stages"]
# Files a module reads or runs by path: mnist.json at import, the MLflow model's entry point
# when the model is logged.
DATA_FILES = {
    "pipeline/data/mnist.py": {"pipeline/data/mnist.json"},
    "pipeline/tracking/runs.py": {"pipeline/tracking/model_code.py"},
}


def module_file(name: str) -> Path:
    path = Path(*name.split("."))
    return path / "__init__.py" if (REPO_ROOT / path).is_dir() else path.with_suffix(".py")


def imported_files(module: str, seen: set[str] | None = None) -> set[str]:
    """The pipeline files that importing `module` runs: itself, its packages, their imports."""
    seen = set() if seen is None else seen
    parts = module.split(".")
    for depth in range(1, len(parts) + 1):  # importing a.b.c runs a/__init__ and a/b/__init__
        name = ".".join(parts[:depth])
        path = module_file(name)
        if str(path) in seen or not (REPO_ROOT / path).is_file():
            continue
        seen.add(str(path))
        seen |= DATA_FILES.get(str(path), set())
        for node in ast.walk(ast.parse((REPO_ROOT / path).read_text())):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                # `from pipeline import tracking` imports the module pipeline.tracking.runs
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            else:
                continue
            for imported in names:
                if imported.split(".")[0] == "pipeline":
                    imported_files(imported, seen)
    return seen


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_a_stages_code_deps_cover_exactly_what_it_imports(stage: str) -> None:
    spec = STAGES[stage]
    assert spec["cmd"] == f"python -m pipeline.stages.{stage}"
    code_deps = {dep for dep in spec["deps"] if dep.startswith("pipeline/")}
    imported = imported_files(f"pipeline.stages.{stage}")

    def under(file: str, dep: str) -> bool:
        return file == dep or file.startswith(dep.rstrip("/") + "/")

    uncovered = {f for f in imported if not any(under(f, dep) for dep in code_deps)}
    assert not uncovered, f"add to {stage}'s deps (or their folders): {sorted(uncovered)}"
    unused = {dep for dep in code_deps if not any(under(f, dep) for f in imported)}
    assert not unused, f"{stage} never imports anything under: {sorted(unused)}"


def test_the_import_walk_follows_from_imports_and_packages() -> None:
    # A check on the checker: download reaches mnist.py only through `from pipeline.data.mnist`.
    files = imported_files("pipeline.stages.download")
    assert {"pipeline/__init__.py", "pipeline/data/__init__.py", "pipeline/data/mnist.py"} <= files
    assert "pipeline/data/mnist.json" in files and "pipeline/tracking/registry.py" not in files
