"""Tensor-parallel collectives of one CoCa micro-batch, per rank (Megatron's scheme as megacoca.parallel.tensor
implements it), counted analytically for the time model (megacoca.plan.timing) and the calibration.

The count is held to the layers themselves: tests/unit/plan/test_comm.py runs tiny CoCas (both pooler layouts, tied
and untied heads, tp 2 and 4, with and without activation checkpointing) forward and backward on the meta device
under the fake process group and compares every collective they issue with these terms, call for call and element
for element (megacoca.profiling.collectives; `benchmarks/tensor_parallel.py comm` does the same for the paper's
flavors). A new tensor-parallel layer, or a collective added to one, fails that test until it has its term here.
"""

from __future__ import annotations


def analytic_comm(cfg, batch: int, act_bytes: int, activation_checkpointing: bool,
                  early_stop: bool = True) -> list[dict]:
    """Megatron's tensor-parallel collectives for one CoCa micro-batch (forward + backward), per rank: row-parallel
    outputs all-reduce in forward, column-parallel inputs (one copy per distinct input) their gradient in backward.
    Every term is (phase, what, calls, elements per call, reduce op, bytes/element, part: "vision" for the ViT
    blocks, which a pipeline spreads over its stages, else "text", the last stage). The pooler query copies are
    Megatron's minimum: the (Q, width) query's gradient, all-reduced once before it is broadcast over the batch."""
    b = batch
    ni, l = cfg.image_tokens, cfg.context_length
    tu, td = l + 1, l - 1  # unimodal text + CLS; decoder positions (inputs text[:, :-1])
    wv, wt, dp_ = cfg.vision_width, cfg.text_width, cfg.pooled_width
    q = cfg.caption_queries
    paper = cfg.pooler_layout == "paper"
    qc = q if paper else q - 1  # caption tokens the decoder cross-attends to
    per_layer = 4 if cfg.decoder_mlp_after_self_attn else 3
    lv, lt, ld = cfg.vision_layers, cfg.text_layers, cfg.decoder_layers
    n = b * td  # caption tokens of the micro-batch
    terms = []

    def add(phase, what, calls, elements, reduce="SUM", nbytes=act_bytes, part="text"):
        terms.append({"phase": phase, "what": what, "calls": calls, "elements": elements, "reduce": reduce,
                      "element_bytes": nbytes, "part": part})

    fwd, bwd = "forward", "backward"
    add(fwd, "ViT blocks: attention out, MLP fc2 (row-parallel)", 2 * lv, b * ni * wv, part="vision")
    add(fwd, "unimodal text blocks: attention out, MLP fc2", 2 * lt, b * tu * wt)
    add(fwd, f"decoder layers: self-attn out, cross-attn out, MLP fc2{', self MLP fc2' if per_layer == 4 else ''}",
        per_layer * ld, b * td * wt)
    add(fwd, "caption pooler: attention out", 1, b * q * dp_)
    if paper:
        add(fwd, "contrastive pooler: attention out", 1, b * 1 * dp_)
    add(fwd, "vocab-parallel token embedding", 1, b * l * wt)
    add(fwd, "vocab-parallel cross-entropy: row max", 1, n, "MAX", 4)
    add(fwd, "vocab-parallel cross-entropy: [sum exp, target logit]", 1, 2 * n, "SUM", 4)
    add(bwd, "ViT blocks: copy before attention, before MLP", 2 * lv, b * ni * wv, part="vision")
    add(bwd, "unimodal text blocks: copy before attention, before MLP", 2 * lt, b * tu * wt)
    add(bwd, f"decoder layers: copy before self-attn, cross-attn query, MLP{', self MLP' if per_layer == 4 else ''}",
        per_layer * ld, b * td * wt)
    add(bwd, "decoder layers: cross-attn context copy (caption image tokens)", ld, b * qc * dp_)
    add(bwd, "caption pooler: query copy (Q x width)", 1, q * dp_)
    add(bwd, "caption pooler: context copy (ViT tokens)", 1, b * ni * wv)
    if paper:
        add(bwd, "contrastive pooler: query copy (1 x width)", 1, dp_)
        if cfg.pooler_cascade:
            add(bwd, "contrastive pooler: context copy (caption pooler outputs)", 1, b * q * dp_)
        else:
            add(bwd, "contrastive pooler: context copy (ViT tokens)", 1, b * ni * wv)
    add(bwd, "caption head: copy of the hidden", 1, b * td * wt)
    if activation_checkpointing:
        # The block's forward again in backward, except its LAST row-parallel all-reduce (the MLP fc2 output):
        # torch's non-reentrant checkpoint stops recomputing once every tensor saved for backward is rebuilt
        # (early stop, on by default), and nothing after fc2's matmul is saved inside the block.
        skip = 1 if early_stop else 0
        add(bwd, "recompute (activation checkpointing): ViT attention out", (2 - skip) * lv, b * ni * wv,
            part="vision")
        add(bwd, "recompute: unimodal text attention out", (2 - skip) * lt, b * tu * wt)
        add(bwd, "recompute: decoder self-attn out, cross-attn out" + (", self MLP fc2" if per_layer == 4 else ""),
            (per_layer - skip) * ld, b * td * wt)
    return terms
