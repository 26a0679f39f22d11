"""Where a run comes from: git state that ignores what DVC rewrites."""

import subprocess
from pathlib import Path

import pytest


def test_git_dirty_ignores_the_files_dvc_rewrites(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from helpers.repo import git_commit
    from pipeline.tracking.provenance import git_tags

    rewritten = (
        "dvc.lock",
        "params.yaml",  # by `dvc exp run -S`
        "metrics/train.json",
        "plots/history.csv",
        "reports/evaluate_breakdown.json",
    )
    for name in (*rewritten, "pipeline/model.py"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("committed\n")
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    git_commit(tmp_path, "a clean clone")
    monkeypatch.chdir(tmp_path)
    for name in rewritten:
        (tmp_path / name).write_text("rewritten by dvc repro\n")
    assert git_tags()["git.dirty"] == "false"
    (tmp_path / "pipeline/model.py").write_text("edited\n")
    assert git_tags()["git.dirty"] == "true"
