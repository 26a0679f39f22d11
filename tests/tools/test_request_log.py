"""serve's request log (tools/request_log.py): exact round trips, its size bound, several writers,
and the windows `monitor` reads."""

from __future__ import annotations

import datetime as dt
import multiprocessing
from pathlib import Path

import numpy as np
import orjson
import pytest

from pipeline.errors import PipelineError
from pipeline.tools.request_log import RequestLog, parse_since, read_requests, rotated

MODEL = {"uri": "models:/mnist-vae@champion", "version": "3", "run_id": "abc"}


def images(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((n, 784), dtype=np.float32)


def test_inputs_and_outputs_come_back_bit_for_bit(tmp_path: Path) -> None:
    log = RequestLog(tmp_path / "requests.jsonl", 1 << 20, MODEL)
    sent = images(3)
    log.append("score", {"method": "score", "samples": 4}, sent, np.array([101.5, 99.0, 3e3]))
    log.append("decode", {"method": "decode"}, images(2)[:, :4], images(2))  # latent: skipped
    assert (tmp_path / "requests.jsonl").stat().st_mode & 0o777 == 0o600  # what clients sent
    record = orjson.loads((tmp_path / "requests.jsonl").read_bytes().splitlines()[0])
    assert record["model"] == MODEL and record["params"]["samples"] == 4
    logged = read_requests(tmp_path / "requests.jsonl")
    assert np.array_equal(logged.images, sent) and logged.requests == 1
    assert logged.models == ["models:/mnist-vae@champion version 3"]
    assert logged.names[2].endswith("row 2")


def test_the_log_and_its_rotated_copy_stay_within_the_bound(tmp_path: Path) -> None:
    path, bound = tmp_path / "requests.jsonl", 1 << 20
    log = RequestLog(path, bound, MODEL)
    for i in range(40):  # 40 x ~105 KB: rotates several times
        log.append("encode", {"method": "encode"}, images(25, i), None)
    assert rotated(path).is_file()
    assert path.stat().st_size + rotated(path).stat().st_size <= bound
    kept = read_requests(path)
    assert np.array_equal(kept.images[-25:], images(25, 39))  # the newest are kept
    log.append("encode", {}, images(700), None)  # over half the bound alone: not logged
    assert read_requests(path, last=1).images.shape == (25, 784)


def write_many(path: str, seed: int, bound: int) -> None:
    log = RequestLog(path, bound, MODEL)
    for i in range(30):
        log.append("score", {"method": "score"}, images(4, seed * 100 + i), np.zeros(4))


@pytest.mark.parametrize("bound", [1 << 30, 1 << 20], ids=["no rotation", "rotating"])
def test_several_workers_append_whole_lines(tmp_path: Path, bound: int) -> None:
    path = tmp_path / "requests.jsonl"
    context = multiprocessing.get_context("fork")
    workers = [context.Process(target=write_many, args=(str(path), s, bound)) for s in range(3)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(30)
        assert worker.exitcode == 0
    kept = read_requests(path)  # every line whole: a damaged one would be a warning or an error
    if bound == 1 << 30:
        assert kept.requests == 90
    else:  # 90 lines of 17 kB: rotated several times, the two files within the bound
        assert 0 < kept.requests < 90
        assert path.stat().st_size + rotated(path).stat().st_size <= bound


def test_last_and_since_choose_the_requests(tmp_path: Path) -> None:
    path = tmp_path / "requests.jsonl"
    log = RequestLog(path, 1 << 20, MODEL)
    for i in range(5):
        log.append("score", {}, images(2, i), np.zeros(2))
    lines = path.read_bytes().splitlines()
    old = orjson.loads(lines[0]) | {"time": "2020-01-01T00:00:00.000+00:00"}
    path.write_bytes(b"\n".join([orjson.dumps(old), *lines[1:]]) + b"\n")
    assert np.array_equal(
        read_requests(path, last=2).images, np.concatenate([images(2, 3), images(2, 4)])
    )
    assert read_requests(path, since="1h").requests == 4
    assert read_requests(path, since="2019-12-31T23:00").requests == 5
    now = dt.datetime(2026, 12, 4, 12, tzinfo=dt.timezone.utc)
    assert parse_since("30m", now) == now - dt.timedelta(minutes=30)
    with pytest.raises(PipelineError, match=r"--since 'yesterday': give a window"):
        parse_since("yesterday", now)
    assert parse_since("1000000000d", now).year == 1  # beyond any log: everything


def test_a_line_a_crash_cut_short_is_skipped_and_the_next_request_starts_its_own(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    path = tmp_path / "requests.jsonl"
    log = RequestLog(path, 1 << 20, MODEL)
    log.append("score", {}, images(2), np.zeros(2))
    path.write_bytes(path.read_bytes() + path.read_bytes()[:100])  # a worker killed mid-write
    log.append("score", {}, images(2, 1), np.zeros(2))
    assert read_requests(path).requests == 2
    assert "1 damaged lines skipped (line 2" in capsys.readouterr().err


def test_an_image_sent_twice_counts_once(tmp_path: Path) -> None:
    path = tmp_path / "requests.jsonl"
    log = RequestLog(path, 1 << 20, MODEL)
    log.append("score", {}, images(3), np.zeros(3))
    log.append("encode", {}, images(3), np.zeros((3, 4)))  # what `mnist-vae score` sends
    logged = read_requests(path)
    assert logged.requests == 2 and len(logged.images) == 3 and logged.repeats == 3


def test_a_damaged_log_is_one_line_naming_the_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "requests.jsonl"
    path.write_bytes(b"not json\n" + b'{"time": "2026-12-04T10:00:00+00:00"}\n')
    with pytest.raises(PipelineError, match=rf"^{path}:1: not a request logged by mnist-vae"):
        read_requests(path)
    with pytest.raises(PipelineError, match="no such request log"):
        read_requests(tmp_path / "missing.jsonl")
