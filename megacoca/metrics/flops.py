"""Training FLOPs per image-text pair of a CoCa model, from its CoCaConfig alone.

Convention (that of PaLM, Megatron and nanochat's `estimate_flops`, so MFU compares across codebases):

* a matmul of an (m, k) by a (k, n) matrix costs 2 m k n FLOPs; normalisations, softmax, GELU, the
  losses and other elementwise work are not counted;
* training costs 3 x forward (backward = 2 x forward); activation-checkpointing recompute is NOT counted,
  so MFU reports model FLOPs, never hardware FLOPs;
* attention scores count the full (q x k) square (2 matmuls: q k^T and p v) even where a causal mask
  skips half of it.

Per tower, with W a width, M an MLP width, N = image tokens, L = context_length, Q = caption queries:

* ViT:        patch embed 2 N (C p^2) W; per layer 2 N (4 W^2 + 2 W M) + attention 2 (2 N^2 W)
* poolers:    per pooler with Lq queries over Lk keys of width Wk, output width D:
              2 (2 Lq D^2 + 2 Lk Wk D) + attention 2 (2 Lq Lk D)
              "paper": caption pooler (Q queries over N image tokens) then a 1-query contrastive pooler
              over its Q outputs; "open_clip": one pooler, Q queries over N image tokens
* unimodal text over L + 1 tokens (CLS appended): per layer 2 (L+1) (4 W^2 + 2 W M) + 2 (2 (L+1)^2 W)
* multimodal decoder over L tokens, per layer: self-attention 2 L 4 W^2 + 2 (2 L^2 W); cross-attention
  2 L 2 W^2 (q, out) + 2 Nc 2 Dc W (k, v from the Nc pooled caption tokens of width Dc) + 2 (2 L Nc W);
  one MLP 2 L 2 W M (two with decoder_mlp_after_self_attn, open_clip's layout)
* heads:      vocabulary 2 (L-1) W V over the caption targets; contrastive projections 2 D E + 2 W E

Pinned in tests/unit/metrics/test_flops.py: open_clip's coca_ViT-L-14 at 214.6 GFLOP forward per pair, against the
214.52 open_clip publishes for it (the `gflops` column of docs/model_profile.csv in
github.com/mlfoundations/open_clip); CoCa giant at 708 and CoCa-Base at 288/18 at 86.3, this convention applied to
the model sizes of the CoCa paper's Table 1 (Yu et al. 2022, arXiv 2205.01917).
"""

from __future__ import annotations

from megacoca.config.model import CoCaConfig


def _linear(tokens: int, fan_in: int, fan_out: int) -> int:
    return 2 * tokens * fan_in * fan_out


def _attention_scores(q_len: int, k_len: int, width: int) -> int:
    return 2 * (2 * q_len * k_len * width)  # q k^T and p v


def _pooler(queries: int, keys: int, key_width: int, width: int) -> tuple[int, int]:
    dense = _linear(queries, width, width) * 2 + _linear(keys, key_width, width) * 2  # q, out; k, v
    return dense, _attention_scores(queries, keys, width)


def forward_flops_breakdown(cfg: CoCaConfig) -> dict[str, int]:
    """Forward FLOPs per pair, split by part; `*_attention` entries are the score matmuls only."""
    n_img = cfg.image_tokens
    w_v, m_v = cfg.vision_width, cfg.vision_mlp_dim
    w_t, m_t = cfg.text_width, cfg.text_mlp_dim
    d = cfg.pooled_width
    seq = cfg.context_length
    parts: dict[str, int] = {}

    parts["vision"] = (_linear(cfg.num_patches, cfg.in_channels * cfg.patch_size ** 2, w_v)
                       + cfg.vision_layers * (_linear(n_img, w_v, 4 * w_v) + _linear(n_img, w_v, 2 * m_v)))
    parts["vision_attention"] = cfg.vision_layers * _attention_scores(n_img, n_img, w_v)

    if cfg.pooler_layout == "paper":
        caption_dense, caption_attn = _pooler(cfg.caption_queries, n_img, w_v, d)
        contrast_dense, contrast_attn = (_pooler(1, cfg.caption_queries, d, d) if cfg.pooler_cascade
                                         else _pooler(1, n_img, w_v, d))
        parts["poolers"] = caption_dense + contrast_dense
        parts["poolers_attention"] = caption_attn + contrast_attn
        caption_tokens = cfg.caption_queries
    else:
        dense, attn = _pooler(cfg.caption_queries, n_img, w_v, d)
        parts["poolers"], parts["poolers_attention"] = dense, attn
        caption_tokens = cfg.caption_queries - 1

    uni = seq + 1
    parts["text"] = cfg.text_layers * (_linear(uni, w_t, 4 * w_t) + _linear(uni, w_t, 2 * m_t))
    parts["text_attention"] = cfg.text_layers * _attention_scores(uni, uni, w_t)

    mlps = 2 if cfg.decoder_mlp_after_self_attn else 1
    per_layer = (_linear(seq, w_t, 4 * w_t)  # self-attention q, k, v, out
                 + _linear(seq, w_t, 2 * w_t)  # cross-attention q, out
                 + _linear(caption_tokens, d, 2 * w_t)  # cross-attention k, v over the pooled tokens
                 + mlps * _linear(seq, w_t, 2 * m_t))
    parts["decoder"] = cfg.decoder_layers * per_layer
    parts["decoder_attention"] = cfg.decoder_layers * (_attention_scores(seq, seq, w_t)
                                                       + _attention_scores(seq, caption_tokens, w_t))

    parts["heads"] = _linear(seq - 1, w_t, cfg.vocab_size) + _linear(1, d, cfg.embed_dim) \
        + _linear(1, w_t, cfg.embed_dim)
    return parts


def objective_only_flops(cfg: CoCaConfig) -> dict[str, int]:
    """Forward FLOPs per pair that only one objective needs, left out by a forward without it (CoCa.forward's
    contrastive= / captioning=): "captioning" the multimodal decoder and the vocabulary head; "contrastive" the
    image projection and the paper layout's contrastive pooler. The unimodal text tower runs whole either way
    (its CLS position and projection too), and so does the paper layout's caption pooler, which the cascaded
    contrastive pooler reads."""
    parts = forward_flops_breakdown(cfg)
    contrastive = _linear(1, cfg.pooled_width, cfg.embed_dim)
    if cfg.pooler_layout == "paper":
        d = cfg.pooled_width
        contrastive += sum(_pooler(1, cfg.caption_queries, d, d) if cfg.pooler_cascade
                           else _pooler(1, cfg.image_tokens, cfg.vision_width, d))
    captioning = (parts["decoder"] + parts["decoder_attention"]
                  + _linear(cfg.context_length - 1, cfg.text_width, cfg.vocab_size))
    return {"contrastive": contrastive, "captioning": captioning}


def forward_flops_per_sample(cfg: CoCaConfig, *, contrastive: bool = True, captioning: bool = True) -> int:
    total = sum(forward_flops_breakdown(cfg).values())
    only = objective_only_flops(cfg)
    return total - (0 if contrastive else only["contrastive"]) - (0 if captioning else only["captioning"])


def train_flops_per_sample(cfg: CoCaConfig, *, contrastive: bool = True, captioning: bool = True) -> int:
    """Model FLOPs of one training step per image-text pair: 3 x forward (see module docstring); without one
    objective, of what its forward still runs."""
    return 3 * forward_flops_per_sample(cfg, contrastive=contrastive, captioning=captioning)


def attention_share(cfg: CoCaConfig) -> float:
    parts = forward_flops_breakdown(cfg)
    return sum(v for k, v in parts.items() if k.endswith("_attention")) / sum(parts.values())
