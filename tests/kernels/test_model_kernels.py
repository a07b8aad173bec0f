"""The CoCa model with kernels="triton" against kernels="torch": same weights, same batch, same numbers.

Runs coca_tiny through megacoca/models/coca/ops.py on CPU (Triton's interpreter, set by conftest): every
attention (vision self-attention, the poolers' cross-attention, causal text attention with a padding
kv_mask, the decoder's cross-attention), every LayerNorm and the fused caption loss go through
megacoca_kernels, and the loss and every parameter's gradient must match the torch path.
"""

import pytest
import torch

from megacoca.models.coca import CoCa, get_flavor
from megacoca.parallel.parallelize import apply_activation_checkpointing


def make_batch(cfg, device, batch=2, length=12):
    generator = torch.Generator().manual_seed(1)
    images = torch.randn(batch, 3, cfg.image_size, cfg.image_size, generator=generator)
    text = torch.randint(4, cfg.vocab_size, (batch, length), generator=generator)
    text[:, 0] = 2
    text[0, 7:] = cfg.pad_id  # one padded caption: kv_mask on the text keys, ignored caption targets
    return images.to(device), text.to(device)


def loss_and_grads(cfg, state, images, text, checkpointed=False):
    model = CoCa(cfg).to(images.device).train()
    model.load_state_dict(state)
    if checkpointed:
        apply_activation_checkpointing(model)
    out = model(images, text)
    contrastive = (out["image_features"] @ out["text_features"].t() * out["logit_scale"]).logsumexp(-1).sum()
    loss = out["caption_loss_sum"] / out["caption_tokens"] + contrastive
    loss.backward()
    grads = {name: p.grad for name, p in model.named_parameters()}
    return loss.detach(), out["caption_loss_sum"].detach(), grads


# coca_tiny's widths and head dim (128 / 4 heads = 32), fewer layers and tokens: the interpreter runs one
# Python-level program per LayerNorm row.
SMALL = dict(image_size=32, caption_queries=8, vocab_size=300, vision_layers=1, text_layers=1, decoder_layers=1)

def count_kernel_calls(monkeypatch):
    import megacoca_kernels

    calls = {"flash_attention": 0, "layer_norm": 0, "linear_cross_entropy": 0}
    for name in calls:
        real = getattr(megacoca_kernels, name)

        def counted(*args, _real=real, _name=name, **kwargs):
            calls[_name] += 1
            return _real(*args, **kwargs)

        monkeypatch.setattr(megacoca_kernels, name, counted)
    return calls


LAYOUTS = {
    "paper": {},
    "open_clip": dict(pooler_layout="open_clip", legacy_cls_mask=True, text_tokens_after_ln=False,
                      decoder_mlp_after_self_attn=True, vision_class_token=True),
    "paper-checkpointed": {},
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_triton_kernels_match_torch_in_the_model(layout, device, monkeypatch):
    calls = count_kernel_calls(monkeypatch)
    base = get_flavor("coca_tiny", **SMALL, **LAYOUTS[layout])
    torch.manual_seed(0)
    state = CoCa(base.replace(kernels="torch")).state_dict()
    images, text = make_batch(base, device)
    ref_loss, ref_caption, ref_grads = loss_and_grads(base.replace(kernels="torch"), state, images, text)
    assert not any(calls.values()), calls
    loss, caption, grads = loss_and_grads(base.replace(kernels="triton"), state, images, text,
                                          checkpointed=layout.endswith("checkpointed"))
    # Guard against the comparison passing because ops.py silently fell back to torch.
    assert all(n > 0 for n in calls.values()), calls
    torch.testing.assert_close(caption, ref_caption, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(loss, ref_loss, atol=1e-5, rtol=1e-5)
    missing = [name for name, g in grads.items() if g is None]
    assert not missing, f"no gradient through the Triton path for {missing}"
    for name, g in grads.items():
        torch.testing.assert_close(g, ref_grads[name], atol=2e-5, rtol=1e-4, msg=lambda m: f"{name}: {m}")
