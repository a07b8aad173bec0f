"""Resume refuses, with one line naming the file, a checkpoint that lacks a file of its layout (a DeepSpeed
partition, a rank's megacoca file); checked before DeepSpeed reads anything. Another layout's checkpoint passes the
check (it is reshaped: tests/distributed/test_reshape.py)."""

import os

import pytest
import torch

from megacoca.checkpoint.files import BadCheckpointError
from megacoca.checkpoint.state import check_resumable


@pytest.fixture
def tag(tmp_path):
    """The files a ZeRO-3 bf16 run on dp=2 writes (contents reduced to what the layout is read from)."""
    tag_dir = tmp_path / "step00000004"
    tag_dir.mkdir()
    for rank in range(2):
        torch.save({"dp_world_size": 2, "optimizer": None, "module": {}},
                   tag_dir / f"zero_pp_rank_{rank}_mp_rank_00_model_states.pt")
        torch.save({}, tag_dir / f"bf16_zero_pp_rank_{rank}_mp_rank_00_optim_states.pt")
        torch.save({"step": 4}, tag_dir / f"megacoca_rank{rank:05d}.pt")
    (tag_dir / "COMPLETE").write_text("4\n")
    return tag_dir


def test_a_complete_checkpoint_passes_with_its_layout(tag):
    files = check_resumable(str(tag))  # the tag's files; their layout is the one Layout type
    assert (files.layout.dp, files.layout.pp, files.layout.tp, files.zero3) == (2, 1, 1, True)


@pytest.mark.parametrize("missing", ["megacoca_rank00001.pt", "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt",
                                     "zero_pp_rank_1_mp_rank_00_model_states.pt"])
def test_a_missing_file_is_named(tag, missing):
    os.remove(tag / missing)
    with pytest.raises(BadCheckpointError) as raised:
        check_resumable(str(tag))
    assert str(tag / missing) in str(raised.value) and "is missing" in str(raised.value)
