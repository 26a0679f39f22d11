"""One team stack for the real-server tests of this folder."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from pipeline.tools.postgres import remove_data
from pipeline.tools.stack import Stack, running_stack


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    # Under pytest's temporary root, mode 0700 like the clone's folder may be: PostgreSQL runs
    # as `nobody` under root, and must find its binaries and data all the same.
    root = tmp_path_factory.mktemp("stack")
    # pytest reuses its folders' names: data that a killed session left for this root (outside
    # it, where the service user cannot enter it) hold another password
    remove_data(root)
    try:
        # The writer's login, S3 keys and PGPASSFILE for every client the tests start, as a
        # user who sourced .stack/writer.env; tests that act as someone else say so.
        with running_stack(root) as running, pytest.MonkeyPatch.context() as env:
            for key, value in running.client_env("writer").items():
                if key != "MLFLOW_TRACKING_URI":
                    env.setenv(key, value)
            yield running
        assert [name for name, p in running.servers.items() if p.poll() is None] == []
    finally:
        remove_data(root)  # outside `root` when `nobody` cannot enter it
