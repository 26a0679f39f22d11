"""One team stack for the real-server tests of this folder: a second start, as after a restart."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from pipeline.tools.postgres import remove_data
from pipeline.tools.stack import Stack, running_stack


@pytest.fixture(scope="session")
def first_start(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, dict[str, str]]]:
    """A stack started once on a new root and stopped: its root and the keys it made."""
    # Under pytest's temporary root, mode 0700 like the clone's folder may be: PostgreSQL runs
    # as `nobody` under root, and must find its binaries and data all the same.
    root = tmp_path_factory.mktemp("stack")
    # pytest reuses its folders' names: data that a killed session left for this root (outside
    # it, where the service user cannot enter it) hold another password
    remove_data(root)
    try:
        with running_stack(root) as first:
            keys = dict(first.keys)
        yield root, keys
    finally:
        remove_data(root)  # outside `root` when `nobody` cannot enter it


@pytest.fixture(scope="session")
def stack(first_start: tuple[Path, dict[str, str]]) -> Iterator[Stack]:
    """The stack started again on the first start's root, as a team restarts it: every test here
    then also checks that a second start keeps the users, their rights, keys and data."""
    root, _ = first_start
    # The writer's login, S3 keys and PGPASSFILE for every client the tests start, as a user who
    # sourced .stack/writer.env; tests that act as someone else say so.
    with running_stack(root) as running, pytest.MonkeyPatch.context() as env:
        for key, value in running.client_env("writer").items():
            if key != "MLFLOW_TRACKING_URI":
                env.setenv(key, value)
        yield running
    assert [name for name, p in running.servers.items() if p.poll() is None] == []
