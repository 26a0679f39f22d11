"""Files the stages write: the same values give the same bytes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pipeline.data.files import read_tensors

WRITE_IN_A_FRESH_PROCESS = """
import sys, torch
from pipeline.data.files import write_tensors
tensors = {f"w{i}": torch.arange(i * 10, dtype=torch.float32) for i in range(6)}
metadata = {f"key{i}": i for i in range(8)}
write_tensors(sys.argv[1], tensors | {"labels": torch.arange(5)}, metadata)
"""


@pytest.mark.slow  # a fresh interpreter importing torch: 4-8 s of the quick loop
def test_tensor_files_are_byte_identical_across_processes(tmp_path: Path) -> None:
    # safetensors writes a metadata map of several keys in hash order, which changes from one
    # process to the next; write_tensors must not depend on it.
    paths = [tmp_path / f"{i}.safetensors" for i in range(2)]
    exec(WRITE_IN_A_FRESH_PROCESS.replace("sys.argv[1]", repr(str(paths[0]))))  # this process
    command = [sys.executable, "-c", WRITE_IN_A_FRESH_PROCESS, str(paths[1])]
    subprocess.run(command, check=True)  # another process: another hash seed
    assert len({path.read_bytes() for path in paths}) == 1
    tensors, metadata = read_tensors(paths[0], "rebuild")
    assert metadata == {f"key{i}": i for i in range(8)}
    assert torch.equal(tensors["w3"], torch.arange(30, dtype=torch.float32))
