"""Flavors match the CoCa paper's Table 1, built on the meta device without allocating memory."""

import pytest
import torch

from megacoca.models.coca import CoCa, FLAVORS, get_flavor

PAPER_PARAMS = {"coca_base": 383e6, "coca_large": 787e6, "coca_giant": 2.1e9}
PAPER_DECODER_PARAMS = {"coca_base": 297e6, "coca_large": 484e6, "coca_giant": 1.1e9}


@pytest.mark.parametrize("name", sorted(PAPER_PARAMS))
def test_flavor_parameter_counts_match_the_paper(name):
    with torch.device("meta"):
        model = CoCa(get_flavor(name))
    assert all(p.is_meta for p in model.parameters())
    total = model.num_params()
    assert abs(total - PAPER_PARAMS[name]) / PAPER_PARAMS[name] < 0.03, total
    decoder = sum(p.numel() for p in {id(p): p for m in (model.text, model.decoder, model.caption_head)
                                      for p in m.parameters()}.values())
    assert abs(decoder - PAPER_DECODER_PARAMS[name]) / PAPER_DECODER_PARAMS[name] < 0.03, decoder


@pytest.mark.parametrize("name", sorted(PAPER_PARAMS))
def test_paper_flavors_use_288px_patch_18_and_64k_vocab(name):
    cfg = FLAVORS[name]
    assert (cfg.image_size, cfg.patch_size, cfg.vocab_size, cfg.num_patches) == (288, 18, 64000, 256)
    assert cfg.caption_queries == 256 and cfg.pooler_layout == "paper"


def test_unknown_flavor_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown model flavor 'coca_huge'"):
        get_flavor("coca_huge")
