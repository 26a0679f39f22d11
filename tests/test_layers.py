"""The package's layers import downward only (import-linter's contracts in pyproject.toml), and
docs/layers.md draws the graph as it is."""

import shutil
import subprocess
import sys
from pathlib import Path

from helpers.repo import REPO_ROOT
from pipeline.tools.layers import LAYERS, contract_layers, imports, layer_of, markdown

LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def lint_imports(root: Path) -> subprocess.CompletedProcess:
    """`lint-imports` on the package under `root`, with `root`'s pyproject.toml."""
    return subprocess.run(
        [str(LINT_IMPORTS), "--config", str(root / "pyproject.toml"), "--no-cache"],
        cwd=root, env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"},
        capture_output=True, text=True,
    )  # fmt: skip


def test_every_contract_is_kept() -> None:
    result = lint_imports(REPO_ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


def test_an_import_that_goes_up_a_layer_or_into_the_training_loop_breaks_a_contract(
    tmp_path: Path,
) -> None:
    shutil.copytree(REPO_ROOT / "pipeline", tmp_path / "pipeline")
    shutil.copy(REPO_ROOT / "pyproject.toml", tmp_path)
    model = tmp_path / "pipeline" / "vae" / "model.py"
    model.write_text(model.read_text() + "\nfrom pipeline.tracking import runs  # noqa\n")
    registry = tmp_path / "pipeline" / "tracking" / "registry.py"
    registry.write_text(registry.read_text() + "\nfrom pipeline.vae import training  # noqa\n")
    result = lint_imports(tmp_path)
    assert result.returncode == 1
    assert "pipeline.vae.model -> pipeline.tracking.runs" in result.stdout
    assert "pipeline.tracking.registry -> pipeline.vae.training" in result.stdout
    assert "2 broken" in result.stdout


def test_every_module_has_a_layer_and_the_docs_page_is_current() -> None:
    graph = imports()
    assert len(contract_layers()) == len(LAYERS)
    assert {layer_of(m) for m in graph} == set(LAYERS)
    assert [layer_of(m) for m in ("pipeline.errors", "pipeline.__main__")] == [
        "foundation",
        "commands",
    ]
    page = (REPO_ROOT / "docs" / "layers.md").read_text()
    assert page == markdown(graph), "run: python -m pipeline.tools.layers > docs/layers.md"
