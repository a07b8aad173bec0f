"""Building a model for a parallel layout (megacoca.parallel.build): equal to the single-device init, shard for
shard, and never holding the whole model.

- TINY (tied head, odd vocabulary) at TP=2 on 2 ranks, ZeRO-0 and ZeRO-3: every parameter of the built model,
  gathered, is bit-equal to the same parameter of `CoCa(cfg)` built on one CPU with the same seed.
- coca_large (798M parameters, 3.19 GB in fp32) at TP=2 x DP=2 on 4 ranks under ZeRO-3: the growth of each
  rank's peak resident memory while building stays under a third of the whole model's fp32 size. Measured on
  the 2-core CPU box: fp32 0.93 GB, bf16 0.79 GB (each rank keeps 200M of the 798M elements; the rest of the
  peak is one parameter's full fp32 init, the 64000 x 1024 token embedding, and its shard). Before the build
  handed freed memory back to the OS (malloc_trim) the same build peaked at 1.54 GB (fp32).
"""

import pytest
import torch
from dist_harness import run_ranks
from gather import full_tensors, module_values
from memory_data import SHARD_ALL, TINY

from megacoca.config.deepspeed import build_deepspeed_config
from megacoca.config.flavors import get_flavor
from megacoca.config.recipes import build_config
from megacoca.models.coca import CoCa
from megacoca.parallel.build import build_parallel_model
from megacoca.parallel.dims import ParallelDims

CFG = TINY.replace(tie_word_embeddings=True, vocab_size=61)


def _ds_config(ds_name: str, dims: ParallelDims) -> dict:
    job = build_config(overrides=[f"parallel.deepspeed_config={ds_name}", f"parallel.tp={dims.tp_size}",
                                  "schedule.global_batch_size=4", "schedule.micro_batch_size=2", SHARD_ALL])
    return build_deepspeed_config(job, dims.dp_size)


def _built_values(rank, world_size, ds_name):
    dims = ParallelDims(dp=-1, tp=2, pp=1, world_size=world_size).build()
    torch.manual_seed(7)
    model = build_parallel_model(CFG, dims, ds_config=_ds_config(ds_name, dims))
    assert all(getattr(p, "tp_shard", None) is not None for p in model.text.embed.token_embedding.parameters())
    assert model.caption_head.weight is model.text.embed.token_embedding.weight  # still tied
    return module_values(model, dims) if ds_name.startswith("zero3") else full_tensors(model, dims, lambda p: p)


@pytest.mark.parametrize("ds_name", ["zero0_fp32", "zero3_fp32"])
def test_built_shards_equal_the_single_device_init(tmp_path, ds_name):
    torch.manual_seed(7)
    reference = {name: p.detach() for name, p in CoCa(CFG).named_parameters()}
    for built in run_ranks(_built_values, 2, tmp_path, ds_name):
        assert built.keys() == reference.keys()
        for name, value in reference.items():
            assert torch.equal(built[name], value), name


def _status_bytes(key: str) -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def _build_peak(rank, world_size, ds_name):
    from megacoca.parallel.zero import partition_stats

    dims = ParallelDims(dp=2, tp=2, pp=1, world_size=world_size).build()
    ds_config = _ds_config(ds_name, dims)
    cfg = get_flavor("coca_large", kernels="torch")
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")  # reset the peak (VmHWM) to the current resident set
    before = _status_bytes("VmRSS:")
    model = build_parallel_model(cfg, dims, ds_config=ds_config)
    stats = partition_stats(model)
    return {"peak": _status_bytes("VmHWM:") - before, "local": stats.local_elements, "tp_local": stats.elements}


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("ds_name", ["zero3_fp32", "zero3_bf16"])
def test_building_coca_large_at_tp2_dp2_holds_a_third_of_the_model_at_most(tmp_path, ds_name):
    with torch.device("meta"):  # counted, not built
        whole = sum(p.numel() for p in CoCa(get_flavor("coca_large")).parameters())
    for rank_result in run_ranks(_build_peak, 4, tmp_path, ds_name, timeout=560):
        assert rank_result["tp_local"] < 0.51 * whole  # this rank's tensor-parallel half ...
        assert rank_result["local"] < 0.26 * whole  # ... of which it keeps its data-parallel half
        assert rank_result["peak"] < whole * 4 / 3, f"{rank_result['peak'] / 1e9:.2f} GB of {whole * 4 / 1e9:.2f} GB"
