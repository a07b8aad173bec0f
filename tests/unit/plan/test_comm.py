"""The planner's analytic tensor-parallel collective count (megacoca.plan.comm.analytic_comm, which the time model
and the calibration divide by) against the collectives the tensor-parallel layers really issue: tiny CoCas built,
parallelized and run forward + backward by the project's own code on the meta device under torch's fake process
group (megacoca.profiling.collectives). Call for call, element for element, per phase: a layer added to
megacoca.parallel.tensor (or a collective added to one) without its term in plan/comm.py fails here."""

import pytest
import torch

from megacoca.config.flavors import get_flavor
from megacoca.launch.ranks import run_ranks
from megacoca.plan.comm import analytic_comm
from megacoca.profiling.collectives import analytic_counts, count_collectives, tp_counts

BATCH = 3
# coca_tiny cut down, two of every repeated layer (so that a per-layer count is checked as such), every text
# position kept (the meta forward cannot trim padding: a host sync), the torch kernels (no Triton on meta tensors)
SMALL = dict(vision_layers=2, text_layers=2, decoder_layers=2, kernels="torch", trim_text_padding=False)
VARIANTS = {
    "paper": {},
    "paper-parallel-poolers": {"pooler_cascade": False},
    "paper-tied-head": {"tie_word_embeddings": True, "decoder_bias": True},
    "open_clip": {"pooler_layout": "open_clip", "decoder_mlp_after_self_attn": True, "vision_class_token": True,
                  "caption_queries": 17},
    "open_clip-tied-pooler-dim": {"pooler_layout": "open_clip", "tie_word_embeddings": True, "pooler_dim": 64,
                                  "vocab_size": 1001},
}
CASES = [(name, tp, checkpointing, dtype) for name in VARIANTS for tp in (2, 4)
         for checkpointing in (False, True) for dtype in ("bf16", "fp32")
         if tp == 2 or (not checkpointing and dtype == "bf16")]


def _count_all(rank, world_size, store_path, cases):
    """In a process of its own (the fake process group replaces the default one): per case, the counted and the
    analytic tensor-parallel collectives, and the ops seen on the tensor-parallel group."""
    out = {}
    for name, tp, checkpointing, dtype in cases:
        cfg = get_flavor("coca_tiny", **SMALL, **VARIANTS[name])
        torch_dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype]
        calls = count_collectives(cfg, tp, 1, BATCH, torch_dtype, checkpointing)
        terms = analytic_comm(cfg, BATCH, 2 if dtype == "bf16" else 4, checkpointing)
        out[(name, tp, checkpointing, dtype)] = (tp_counts(calls), analytic_counts(terms),
                                                 {c["op"] for c in calls if c["group"] == "tp"})
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return out


@pytest.fixture(scope="module")
def counted():
    return run_ranks(_count_all, 1, CASES, init=False, timeout=600, preload=["torch", "torch.distributed"])[0]


@pytest.mark.parametrize("case", CASES, ids=["-".join(map(str, case)).replace("True", "ckpt").replace("False", "")
                                             .replace("--", "-") for case in CASES])
def test_analytic_count_is_what_the_layers_issue(counted, case):
    real, analytic, ops = counted[case]
    assert ops == {"all_reduce"}, ops  # training never gathers over the tensor-parallel group (logits stay sharded)
    missing = {key: n for key, n in (real - analytic).items()}  # issued, not counted by plan/comm.py
    extra = {key: n for key, n in (analytic - real).items()}  # counted, never issued
    assert not missing and not extra, f"(phase, op, elements, bytes): issued but not counted {missing}; " \
                                      f"counted but not issued {extra}"
