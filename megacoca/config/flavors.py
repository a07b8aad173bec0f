"""Named model sizes (CoCaConfig presets). coca_base/large/giant follow Table 1 of the CoCa paper (288px, patch 18,
64k vocab); coca_tiny is for tests and the CPU demo."""

from __future__ import annotations

from megacoca.config.model import CoCaConfig

_PAPER = dict(image_size=288, patch_size=18, vocab_size=64000, context_length=64, caption_queries=256)

FLAVORS: dict[str, CoCaConfig] = {
    # Tests and the CPU demo: trains in minutes on 2 cores.
    "coca_tiny": CoCaConfig(
        image_size=64, patch_size=8, vision_width=128, vision_layers=3, vision_heads=4, vision_mlp_dim=512,
        caption_queries=32, pooler_heads=4, vocab_size=1000, context_length=32, text_width=128,
        text_heads=4, text_mlp_dim=512, text_layers=2, decoder_layers=2, embed_dim=128,
    ),
    "coca_base": CoCaConfig(
        **_PAPER, vision_width=768, vision_layers=12, vision_heads=12, vision_mlp_dim=3072, pooler_heads=12,
        text_width=768, text_heads=12, text_mlp_dim=3072, text_layers=12, decoder_layers=12, embed_dim=768,
    ),
    "coca_large": CoCaConfig(
        **_PAPER, vision_width=1024, vision_layers=24, vision_heads=16, vision_mlp_dim=4096, pooler_heads=16,
        text_width=1024, text_heads=16, text_mlp_dim=4096, text_layers=12, decoder_layers=12, embed_dim=1024,
    ),
    "coca_giant": CoCaConfig(
        **_PAPER, vision_width=1408, vision_layers=40, vision_heads=16, vision_mlp_dim=6144, pooler_heads=16,
        text_width=1408, text_heads=16, text_mlp_dim=5632, text_layers=18, decoder_layers=18, embed_dim=1408,
        # The paper's 1.1B decoder (2.1B total) only adds up with the vocabulary head tied to the token
        # embedding; its Base and Large decoder counts (297M, 484M) only add up untied.
        tie_word_embeddings=True,
    ),
}


def get_flavor(name: str, **overrides) -> CoCaConfig:
    if name not in FLAVORS:
        raise ValueError(f"unknown model flavor {name!r}; choose one of {', '.join(FLAVORS)}")
    return FLAVORS[name].replace(**overrides)
