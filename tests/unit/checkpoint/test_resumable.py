"""Resume refuses, with one line naming the reason, a checkpoint that lacks a file of its layout (a DeepSpeed
partition, a rank's megacoca file) or that another layout wrote; checked before DeepSpeed reads anything."""

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


def test_the_same_layout_resumes(tag):
    check_resumable(str(tag), dp_size=2, zero3=True)


@pytest.mark.parametrize("layout, message", [
    (dict(dp_size=1, zero3=True), "it was written by dp=2 x pp=1 x tp=1 ranks under ZeRO-3, this run is dp=1 x "
                                  "pp=1 x tp=1 under ZeRO-3; resuming under another layout is not supported yet"),
    (dict(dp_size=1, tp_size=2, zero3=True), "this run is dp=1 x pp=1 x tp=2 under ZeRO-3"),
    (dict(dp_size=2, zero3=False), "this run is dp=2 x pp=1 x tp=1 under ZeRO-0/1/2"),
])
def test_another_layout_is_one_line(tag, layout, message):
    with pytest.raises(BadCheckpointError) as raised:
        check_resumable(str(tag), **layout)
    assert message in str(raised.value) and "\n" not in str(raised.value)


@pytest.mark.parametrize("missing", ["megacoca_rank00001.pt", "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt",
                                     "zero_pp_rank_1_mp_rank_00_model_states.pt"])
def test_a_missing_file_is_named(tag, missing):
    os.remove(tag / missing)
    with pytest.raises(BadCheckpointError) as raised:
        check_resumable(str(tag), dp_size=2, zero3=True)
    assert str(tag / missing) in str(raised.value) and "is missing" in str(raised.value)
