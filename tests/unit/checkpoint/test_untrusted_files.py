"""No checkpoint file is unpickled beyond tensors and plain data: a file whose pickle would run code is refused
with one line naming it, by eval, convert and consolidation (resume: tests/distributed/test_checkpoint_faults.py),
and the code never runs; the types DeepSpeed's files and megacoca's rank files hold still load."""

import os
import random

import numpy as np
import pytest
import torch

from megacoca.checkpoint import BadCheckpointError, UnsafeCheckpointError, consolidated_state_dict, safe_load
from megacoca.checkpoint.tags import rng_state, set_rng_state
from megacoca.cli import main as cli
from megacoca.models.coca import CoCa, get_flavor

OVERRIDES = dict(image_size=32, patch_size=8, vocab_size=64, context_length=16, kernels="torch")


class RunsCode:
    """Unpickling this runs a shell command: what a malicious checkpoint carries."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _tag(root, files: dict) -> str:
    """A complete megacoca checkpoint tag directory holding `files` ({name: object to torch.save})."""
    tag_dir = root / "checkpoints" / "step00000001"
    os.makedirs(tag_dir)
    for name, value in files.items():
        torch.save(value, tag_dir / name)
    (tag_dir / "COMPLETE").write_text("1\n")
    (root / "checkpoints" / "latest").write_text("step00000001")
    return str(tag_dir)


@pytest.fixture
def model_states():
    torch.manual_seed(0)
    module = CoCa(get_flavor("coca_tiny", **OVERRIDES)).state_dict()
    job = {"name": "t", "model": {"flavor": "coca_tiny", "overrides": OVERRIDES}}
    return {"module": module, "step": 1, "dp_size": 1, "config": job}


def test_eval_and_convert_refuse_a_model_file_that_would_run_code(tmp_path, model_states, capsys):
    marker = tmp_path / "code_ran"
    tag_dir = _tag(tmp_path, {"mp_rank_00_model_states.pt": dict(model_states, config=RunsCode(marker))})
    evil = os.path.join(tag_dir, "mp_rank_00_model_states.pt")
    assert cli(["convert", "from-deepspeed", "--input", tag_dir, "--output", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("megacoca convert from-deepspeed: error: ") and len(err.splitlines()) == 1
    assert err.endswith(f"refused to load {evil}: it holds posix.system, which is not a tensor or plain data "
                        "(loading it would let the file run code)")
    from megacoca.data import shapes

    shapes.write_split(str(tmp_path), "val", 4, image_size=32, shard_size=4)
    assert cli(["eval", "--checkpoint", str(tmp_path / "checkpoints"), "--shards", str(tmp_path / "val"),
                "--tokenizer", "clip-bpe"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"refused to load {evil}" in err
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_consolidation_checks_every_file_before_zero_to_fp32_reads_any(tmp_path, model_states):
    """DeepSpeed's zero_to_fp32 loads with weights_only=False: an optimizer shard that would run code is refused
    before it gets the chance."""
    marker = tmp_path / "code_ran"
    tag_dir = _tag(tmp_path, {"zero_pp_rank_0_mp_rank_00_model_states.pt": model_states,
                              "zero_pp_rank_0_mp_rank_00_optim_states.pt": {"optimizer_state_dict": RunsCode(marker)}})
    with pytest.raises(UnsafeCheckpointError, match="zero_pp_rank_0_mp_rank_00_optim_states.pt: it holds posix.system"):
        consolidated_state_dict(tag_dir)
    assert not marker.exists()


def test_from_open_clip_refuses_a_file_that_would_run_code(tmp_path, capsys):
    marker = tmp_path / "code_ran"
    torch.save({"state_dict": RunsCode(marker)}, tmp_path / "open_clip.pt")
    assert cli(["convert", "from-open-clip", "--model", "coca_ViT-B-32", "--input", str(tmp_path / "open_clip.pt"),
                "--output", str(tmp_path / "out"), "--no-check"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "refused to load" in err and "posix.system" in err
    assert not marker.exists()


def test_a_file_that_is_not_a_checkpoint_is_one_line(tmp_path):
    """Not a pickle at all: refused like any pickle with what weights_only does not allow; a truncated torch
    file: cannot be read. One line naming the file either way, mmap or not."""
    junk, cut = tmp_path / "junk.pt", tmp_path / "cut.pt"
    junk.write_bytes(b"not a torch file")
    torch.save({"w": torch.zeros(1000)}, cut)
    cut.write_bytes(cut.read_bytes()[:2000])
    for mmap in (False, True):
        for path, start in ((junk, f"refused to load {junk}: "), (cut, f"cannot read {cut}: ")):
            with pytest.raises(BadCheckpointError) as info:
                safe_load(str(path), mmap=mmap)
            assert str(info.value).startswith(start) and "\n" not in str(info.value), str(info.value)


def test_deepspeed_optimizer_state_types_load(tmp_path):
    """What DeepSpeed's ZeRO files hold beyond tensors (seen in ZeRO 1/2/3, bf16/fp32, offload) is allowed."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    state = {"loss_scaler": LossScaler(1.0), "dynamic": DynamicLossScaler(2.0 ** 16, 1000, 1, 2, False),
             "zero_stage": ZeroStageEnum.optimizer_states, "mapping": {"w": fragment_address(numel=4, start=8)},
             "fp32": torch.arange(4.0)}
    torch.save(state, tmp_path / "optim_states.pt")
    loaded = safe_load(str(tmp_path / "optim_states.pt"))
    assert loaded["zero_stage"] is ZeroStageEnum.optimizer_states and loaded["mapping"]["w"].start == 8
    assert loaded["loss_scaler"].cur_scale == 1.0 and loaded["dynamic"].cur_scale == 2.0 ** 16
    assert torch.equal(loaded["fp32"], torch.arange(4.0))


def test_rank_file_rng_state_is_tensors_and_data(tmp_path):
    """megacoca's per-rank file: the RNG states load under weights_only and restore every generator; a file in
    the older layout (numpy's state as an array) loads too."""
    torch.save({"rng": rng_state()}, tmp_path / "rank.pt")
    expected = (random.random(), np.random.rand(), np.random.randn(), torch.rand(1).item())
    set_rng_state(safe_load(str(tmp_path / "rank.pt"))["rng"])
    assert (random.random(), np.random.rand(), np.random.randn(), torch.rand(1).item()) == expected

    legacy = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    torch.save({"rng": legacy}, tmp_path / "old.pt")
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    set_rng_state(safe_load(str(tmp_path / "old.pt"))["rng"])
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


def test_zero_to_fp32_reads_through_the_verified_loader(tmp_path):
    """A file replaced after the tag was verified: DeepSpeed's zero_to_fp32 (which loads with weights_only=False)
    reads it through safe_load while megacoca uses it, so the code in it never runs; outside, its torch is torch."""
    from deepspeed.utils import zero_to_fp32

    from megacoca.checkpoint.consolidate import quiet_zero_to_fp32

    marker = tmp_path / "code_ran"
    path = tmp_path / "mp_rank_00_model_states.pt"
    torch.save({"module": {}, "buffer_names": [], "evil": RunsCode(marker)}, path)
    with quiet_zero_to_fp32() as module, pytest.raises(UnsafeCheckpointError, match="mp_rank_00_model_states.pt"):
        module.parse_model_states([str(path)])
    assert not marker.exists()
    assert zero_to_fp32.torch is torch
    torch.save({"module": {"w": torch.ones(2)}, "buffer_names": [], "param_shapes": [], "shared_params": {}}, path)
    with quiet_zero_to_fp32() as module:
        assert module.parse_model_states([str(path)])[0].buffers == {}
