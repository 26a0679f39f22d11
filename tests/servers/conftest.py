"""One team stack for the real-server tests of this folder: a second start, as after a restart."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from helpers.repo import LOGINS_WORK, FirstStart, login_statuses, still_running
from pipeline.tools.postgres import remove_data
from pipeline.tools.stack import Stack, running_stack


@pytest.fixture(scope="session")
def first_start(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FirstStart]:
    """A stack started once on a new root, checked, given a run, and stopped."""
    from mlflow.tracking import MlflowClient

    # Under pytest's temporary root, mode 0700 like the clone's folder may be: PostgreSQL runs
    # as `nobody` under root, and must find its binaries and data all the same.
    root = tmp_path_factory.mktemp("stack")
    # pytest reuses its folders' names: data that a killed session left for this root (outside
    # it, where the service user cannot enter it) hold another password
    remove_data(root)
    try:
        with running_stack(root) as first, pytest.MonkeyPatch.context() as env:
            assert login_statuses(first.tracking_uri, first.keys) == LOGINS_WORK
            for key, value in first.client_env("writer").items():
                env.setenv(key, value)
            client = MlflowClient(first.tracking_uri)
            experiment_id = client.get_experiment_by_name("mnist-vae").experiment_id
            run = client.create_run(experiment_id, run_name="before-the-restart")
            client.log_text(run.info.run_id, "written before the restart", "marker.txt")
            client.set_terminated(run.info.run_id)
            made = FirstStart(root, dict(first.keys), experiment_id, run.info.run_id)
        assert still_running(first.servers) == []
        yield made
    finally:
        remove_data(root)  # outside `root` when `nobody` cannot enter it


@pytest.fixture(scope="session")
def stack(first_start: FirstStart) -> Iterator[Stack]:
    """The stack started again on the first start's root, as a team restarts it: every test here
    runs against a second start."""
    # The writer's login, S3 keys and PGPASSFILE for every client the tests start, as a user who
    # sourced .stack/writer.env; tests that act as someone else say so.
    with running_stack(first_start.root) as running, pytest.MonkeyPatch.context() as env:
        for key, value in running.client_env("writer").items():
            if key != "MLFLOW_TRACKING_URI":
                env.setenv(key, value)
        yield running
    assert still_running(running.servers) == []
