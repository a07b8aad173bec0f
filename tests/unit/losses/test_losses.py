"""Single-process behaviour of the CoCa losses (the 2-rank equivalence lives in tests/distributed)."""

import math

import pytest
import torch
import torch.nn.functional as F

from megacoca.losses import CoCaLoss, caption_loss, contrastive_loss


def features(batch=6, dim=8, seed=0):
    generator = torch.Generator().manual_seed(seed)
    image = F.normalize(torch.randn(batch, dim, generator=generator), dim=-1)
    text = F.normalize(torch.randn(batch, dim, generator=generator), dim=-1)
    return image, text


def test_contrastive_loss_is_symmetric_infonce():
    image, text = features()
    scale = torch.tensor([10.0])
    logits = scale * image @ text.T
    labels = torch.arange(6)
    expected = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
    torch.testing.assert_close(contrastive_loss(image, text, scale), expected)


def test_contrastive_loss_of_perfect_pairs_goes_to_zero_with_scale():
    image = torch.eye(4)
    assert contrastive_loss(image, image, torch.tensor([100.0])) < 1e-6
    torch.testing.assert_close(contrastive_loss(image, image, torch.tensor([0.0])), torch.tensor(math.log(4)))


def test_caption_loss_single_process_is_the_token_mean():
    torch.testing.assert_close(caption_loss(torch.tensor(12.0), torch.tensor(4)), torch.tensor(3.0))


def test_coca_loss_weights_and_parts():
    image, text = features()
    out = {
        "image_features": image, "text_features": text, "logit_scale": torch.tensor([5.0]),
        "caption_loss_sum": torch.tensor(20.0), "caption_tokens": torch.tensor(10),
    }
    loss, parts = CoCaLoss(contrastive_weight=1.0, caption_weight=2.0)(out)
    torch.testing.assert_close(loss, parts["loss_contrastive"] + 2.0 * parts["loss_caption"])
    torch.testing.assert_close(parts["loss_caption"], torch.tensor(2.0))
    caption_only, _ = CoCaLoss(contrastive_weight=0.0, caption_weight=1.0)(out)
    torch.testing.assert_close(caption_only, torch.tensor(2.0))


def test_coca_loss_rejects_bad_weights():
    with pytest.raises(ValueError, match="not both 0"):
        CoCaLoss(0.0, 0.0)
    with pytest.raises(ValueError, match="must be >= 0"):
        CoCaLoss(-1.0, 2.0)


def test_a_zero_weight_drops_its_objective():
    """A weight of 0 asks the model not to compute that objective (model_kwargs) and reads none of its outputs;
    its logged part is 0."""
    image, text = features()
    contrastive_only = CoCaLoss(contrastive_weight=1.0, caption_weight=0.0)
    assert contrastive_only.model_kwargs == {"contrastive": True, "captioning": False}
    loss, parts = contrastive_only({"image_features": image, "text_features": text, "logit_scale": torch.tensor([5.0])})
    torch.testing.assert_close(loss, contrastive_loss(image, text, torch.tensor([5.0])))
    assert float(parts["loss_caption"]) == 0.0
    captioning_only = CoCaLoss(contrastive_weight=0.0, caption_weight=2.0)
    assert captioning_only.model_kwargs == {"contrastive": False, "captioning": True}
    loss, parts = captioning_only({"logit_scale": torch.tensor([5.0]), "caption_loss_sum": torch.tensor(20.0),
                                   "caption_tokens": torch.tensor(10)})
    torch.testing.assert_close(loss, torch.tensor(4.0))
    assert float(parts["loss_contrastive"]) == 0.0
    assert CoCaLoss().model_kwargs == {"contrastive": True, "captioning": True}
