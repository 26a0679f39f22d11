"""Expected failures become one line with the shell's exit code; bugs keep their traceback."""

from __future__ import annotations

import signal

import pytest

from pipeline.errors import Interrupted, explain


def test_ctrl_c_and_sigterm_become_one_line_with_the_shells_exit_code(capsys) -> None:
    assert explain(KeyboardInterrupt()).exit_code == 130
    error = Interrupted(signal.SIGTERM)
    assert error.exit_code == 143
    assert str(error) == "interrupted by SIGTERM; no output was half-written: run it again"


@pytest.mark.parametrize(
    "failure",
    [
        RuntimeError(
            "[enforce fail at alloc_cpu.cpp:121] DefaultCPUAllocator: can't allocate "
            "memory: you tried to allocate 40000000000000 bytes."
        ),  # fmt: skip
        MemoryError(),
    ],
)
def test_running_out_of_memory_names_the_size_params(failure: BaseException) -> None:
    message = str(explain(failure))
    assert message.startswith("out of memory (")
    assert "model.hidden_dim, model.hidden_layers, train.batch_size" in message
    assert "sample.n_samples" in message


def test_a_bug_keeps_its_traceback() -> None:
    assert explain(ValueError("a bug")) is None
    assert explain(RuntimeError("shape mismatch")) is None
