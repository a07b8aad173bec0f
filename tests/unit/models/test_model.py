"""Behaviour of the CoCa model: causality, padding isolation, pooler layouts, stages, checkpointing."""

import pytest
import torch

from megacoca.config.model import CoCaConfig
from megacoca.models.coca import CoCa, get_flavor
from megacoca.models.coca.text import kept_text_length, text_key_mask
from megacoca.parallel.parallelize import apply_activation_checkpointing, transformer_blocks

PAD = 0


def tiny_config(**changes) -> CoCaConfig:
    base = dict(
        image_size=32, patch_size=8, vision_width=32, vision_layers=2, vision_heads=2, vision_mlp_dim=64,
        caption_queries=8, pooler_heads=2, vocab_size=50, context_length=12, text_width=32, text_heads=2,
        text_mlp_dim=64, text_layers=2, decoder_layers=2, embed_dim=16, kernels="torch",
    )
    base.update(changes)
    return CoCaConfig(**base)


def make_batch(cfg: CoCaConfig, batch: int = 3, length: int = 10, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(batch, 3, cfg.image_size, cfg.image_size, generator=generator)
    text = torch.randint(4, cfg.vocab_size, (batch, length), generator=generator)
    text[:, 0] = 2
    return images, text


def pad_rows(text: torch.Tensor, lengths: list[int]) -> torch.Tensor:
    """Row i keeps its first lengths[i] tokens (the last of them eos = 3), then padding: a different amount of
    padding per row, so that a mask built from one row's padding and applied to all is wrong for the others."""
    text = text.clone()
    for row, length in enumerate(lengths):
        text[row, length - 1] = 3
        text[row, length:] = PAD
    return text


@pytest.fixture(params=["paper", "open_clip"])
def model(request) -> CoCa:
    torch.manual_seed(0)
    open_clip = request.param == "open_clip"
    cfg = tiny_config(
        pooler_layout=request.param, legacy_cls_mask=open_clip, text_tokens_after_ln=not open_clip,
        decoder_mlp_after_self_attn=open_clip, vision_class_token=open_clip,
    )
    return CoCa(cfg).eval()


def test_forward_outputs_are_normalised_and_shaped(model):
    images, text = make_batch(model.cfg)
    out = model(images, text, caption_loss=False)
    assert out["image_features"].shape == (3, 16) and out["text_features"].shape == (3, 16)
    torch.testing.assert_close(out["image_features"].norm(dim=-1), torch.ones(3))
    torch.testing.assert_close(out["text_features"].norm(dim=-1), torch.ones(3))
    assert out["logits"].shape == (3, 9, 50)
    assert out["logit_scale"].shape == (1,)
    torch.testing.assert_close(out["logit_scale"], torch.tensor([1 / 0.07]))


def test_caption_logits_are_causal(model):
    """Changing token t+1 leaves the caption logits at positions <= t unchanged, and changes later ones; rows
    have different padding (row 1 is unpadded, so its later logits must change)."""
    images, text = make_batch(model.cfg)
    text = pad_rows(text, [8, 10, 9])
    base = model(images, text, caption_loss=False)["logits"]
    for t in (2, 5):
        changed = text.clone()
        changed[:, t + 1] = (changed[:, t + 1] + 7) % 46 + 4
        logits = model(images, changed, caption_loss=False)["logits"]
        torch.testing.assert_close(logits[:, : t + 1], base[:, : t + 1], rtol=0, atol=1e-6)
        assert not torch.allclose(logits[1, t + 1 :], base[1, t + 1 :])


def test_rows_of_a_batch_are_independent(model):
    """Each row's outputs in a batch with different padding per row equal that row run alone (its own padding,
    its own trimming): features, caption logits at its real positions, and its caption loss. A mask that mixes
    rows (one row's padding applied to all) breaks this."""
    images, text = make_batch(model.cfg, batch=4, length=12, seed=3)
    text = pad_rows(text, [4, 12, 7, 9])
    batch = model(images, text, caption_loss=False)
    for row, length in enumerate([4, 12, 7, 9]):
        alone = model(images[row:row + 1], text[row:row + 1], caption_loss=False)
        for key in ("image_features", "text_features"):
            torch.testing.assert_close(batch[key][row:row + 1], alone[key], rtol=1e-5, atol=1e-6,
                                       msg=lambda m: f"row {row} {key}: {m}")
        torch.testing.assert_close(batch["logits"][row, : length - 1], alone["logits"][0, : length - 1],
                                   rtol=1e-5, atol=1e-5, msg=lambda m: f"row {row} logits: {m}")
        loss_alone = model(images[row:row + 1], text[row:row + 1])
        assert int(loss_alone["caption_tokens"]) == length - 1
        targets = text[row, 1:]
        expected = torch.nn.functional.cross_entropy(batch["logits"][row], targets, ignore_index=PAD, reduction="sum")
        torch.testing.assert_close(loss_alone["caption_loss_sum"], expected, rtol=1e-5, atol=1e-5)


LENGTHS = [6, 10, 3]  # real tokens per row: row 1 unpadded, rows 0 and 2 padded by different amounts


def noise(*shape) -> torch.Tensor:
    """A perturbation LayerNorm cannot remove (adding a constant to every feature would be invisible)."""
    return 3.0 * torch.randn(*shape, generator=torch.Generator().manual_seed(7))


def test_text_embedding_never_sees_padding():
    """With the default mask, neither the CLS output (the text embedding) nor any real token's output
    depends on what the padded positions hold: perturb their positional embeddings and see no change. Rows
    have different padding, so each row's pads are at positions another row uses."""
    torch.manual_seed(0)
    model = CoCa(tiny_config()).eval()
    _, text = make_batch(model.cfg, length=10)
    text = pad_rows(text, LENGTHS)
    embedding, tokens = model.text(text)
    for row, length in enumerate(LENGTHS):
        if length == text.shape[1]:
            continue
        perturbed = CoCa(tiny_config()).eval()
        perturbed.load_state_dict(model.state_dict())
        with torch.no_grad():
            perturbed.text.embed.positional_embedding[length:10].add_(noise(10 - length, 32))
        new_embedding, new_tokens = perturbed.text(text)
        torch.testing.assert_close(new_embedding[row], embedding[row], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(new_tokens[row, :length], tokens[row, :length], rtol=1e-5, atol=1e-6)
        assert (new_embedding[1] - embedding[1]).abs().max() > 1e-3  # the unpadded row sees those positions
    with torch.no_grad():
        model.text.embed.positional_embedding[2].add_(noise(32))  # a real position of every row: each CLS sees it
    changed = model.text(text)[0]
    assert all((changed[row] - embedding[row]).abs().max() > 1e-3 for row in range(len(LENGTHS)))


def test_cls_ignores_pad_embeddings():
    """Perturbing the pad token's embedding row changes no real output and no CLS, whatever each row's padding."""
    torch.manual_seed(0)
    model = CoCa(tiny_config()).eval()
    _, text = make_batch(model.cfg, length=10)
    text = pad_rows(text, LENGTHS)
    embedding, tokens = model.text(text)
    with torch.no_grad():
        model.text.embed.token_embedding.weight[PAD].add_(noise(32))
    new_embedding, new_tokens = model.text(text)
    torch.testing.assert_close(new_embedding, embedding, rtol=1e-5, atol=1e-6)
    for row, length in enumerate(LENGTHS):
        torch.testing.assert_close(new_tokens[row, :length], tokens[row, :length], rtol=1e-5, atol=1e-6)
    with torch.no_grad():  # the same perturbation on a real token's row does reach the CLS
        model.text.embed.token_embedding.weight[int(text[1, 4])].add_(noise(32))
    assert (model.text(text)[0][1] - embedding[1]).abs().max() > 1e-3


def effective_mask(text, legacy):
    """The (B, L+1, L+1) mask the text stage applies: causal and the key mask."""
    keys = text_key_mask(text, PAD, legacy_cls_mask=legacy)
    causal = torch.ones(keys.shape[1], keys.shape[1], dtype=torch.bool).tril()
    return causal & keys[:, None, :]


def test_legacy_cls_mask_is_open_clips_shifted_mask():
    text = torch.tensor([[2, 5, 6, 0, 0], [2, 5, 6, 7, 8]])
    mask = effective_mask(text, legacy=True)
    # CLS row: key 0 always, key j when token j-1 is real: sees the first pad, not itself on padded text.
    assert mask[0, -1].tolist() == [True, True, True, True, False, False]
    assert mask[1, -1].tolist() == [True] * 6
    # open_clip applies the shifted pad mask to every row: real rows stay causal, pad rows (3, 4) see keys
    # up to the first pad.
    assert torch.equal(mask[0, :3], torch.ones(3, 6, dtype=torch.bool).tril())
    assert mask[0, 3].tolist() == [True] * 4 + [False] * 2
    assert mask[0, 4].tolist() == [True] * 4 + [False] * 2
    assert torch.equal(mask[1, :-1], torch.ones(5, 6, dtype=torch.bool).tril())
    mask = effective_mask(text, legacy=False)
    assert mask[0, -1].tolist() == [True, True, True, False, False, True]
    assert mask[0, 4].tolist() == [True, True, True, False, False, False]


def test_caption_loss_ignores_padding_and_matches_logits(model):
    images, text = make_batch(model.cfg)
    text[0, 7:] = PAD
    out = model(images, text)
    logits = model(images, text, caption_loss=False)["logits"]
    targets = text[:, 1:]
    expected = torch.nn.functional.cross_entropy(
        logits.reshape(-1, 50), targets.reshape(-1), ignore_index=PAD, reduction="sum"
    )
    torch.testing.assert_close(out["caption_loss_sum"], expected, rtol=1e-5, atol=1e-5)
    assert int(out["caption_tokens"]) == int((targets != PAD).sum())


def test_paper_pooler_cascades_contrastive_on_caption_tokens():
    torch.manual_seed(0)
    model = CoCa(tiny_config()).eval()
    images, _ = make_batch(model.cfg)
    embedding, caption_tokens = model.image_stage(images)
    assert caption_tokens.shape == (3, 8, 32)
    pooler = model.image_pooler
    expected = pooler.projection(pooler.ln_post(pooler.contrastive_pooler(caption_tokens)[:, 0]))
    torch.testing.assert_close(embedding, expected)


def test_paper_pooler_without_cascade_reads_the_image_tokens():
    """pooler_cascade=False: the contrastive pooler attends to the image tokens, so the embedding owes nothing to
    the caption pooler (no gradient reaches its query), where the cascade's does."""
    for cascade in (True, False):
        torch.manual_seed(0)
        model = CoCa(tiny_config(pooler_cascade=cascade)).eval()
        images, _ = make_batch(model.cfg)
        embedding, caption_tokens = model.image_stage(images)
        pooler = model.image_pooler
        if not cascade:
            expected = pooler.projection(pooler.ln_post(pooler.contrastive_pooler(model.vision(images))[:, 0]))
            torch.testing.assert_close(embedding, expected)
        embedding.sum().backward()
        reached = pooler.caption_pooler.query.grad is not None and pooler.caption_pooler.query.grad.abs().sum() > 0
        assert reached == cascade
        assert pooler.contrastive_pooler.query.grad.abs().sum() > 0


def test_pooler_query_std_sets_the_queries_initial_scale():
    for std in (0.02, 1.0):
        torch.manual_seed(0)
        model = CoCa(tiny_config(caption_queries=256, pooler_query_std=std))
        assert model.image_pooler.caption_pooler.query.std().item() == pytest.approx(std, rel=0.1)


def test_open_clip_pooler_uses_query_zero_for_contrastive():
    torch.manual_seed(0)
    cfg = tiny_config(pooler_layout="open_clip", vision_class_token=True)
    model = CoCa(cfg).eval()
    images, _ = make_batch(cfg)
    embedding, caption_tokens = model.image_stage(images)
    assert caption_tokens.shape == (3, 7, 32)
    assert model.image_pooler.contrastive_pooler is None
    pooled = model.image_pooler.ln_post(model.image_pooler.caption_pooler(model.vision(images)))
    torch.testing.assert_close(embedding, model.image_pooler.projection(pooled[:, 0]))
    torch.testing.assert_close(caption_tokens, pooled[:, 1:])


def test_activation_checkpointing_gives_same_loss_and_gradients():
    images, text = make_batch(tiny_config())
    results = []
    for checkpointed in (False, True):
        torch.manual_seed(0)
        model = CoCa(tiny_config()).train()
        if checkpointed:
            apply_activation_checkpointing(model)
            assert all(block.activation_checkpointed for block in transformer_blocks(model))
        out = model(images, text)
        loss = out["caption_loss_sum"] + (out["image_features"] * out["text_features"]).sum() * out["logit_scale"].sum()
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
    torch.testing.assert_close(results[0][0], results[1][0])
    for plain, recomputed in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(plain, recomputed)


def test_trimming_trailing_padding_changes_no_loss_or_gradient(model):
    """The training forward drops the batch's all-pad tail; loss, caption token count, text embeddings and
    every gradient equal the full-length forward's."""
    images, text = make_batch(model.cfg, length=12)
    text[:, 5:] = PAD
    text[0, 5:7] = torch.tensor([9, 3])  # the longest caption ends at position 6
    assert kept_text_length(text, PAD, model.cfg.legacy_cls_mask, multiple=1) == 7 + model.cfg.legacy_cls_mask
    assert kept_text_length(text, PAD, model.cfg.legacy_cls_mask) == 8
    results = []
    for trim in (False, True):
        model.cfg.trim_text_padding = trim
        model.zero_grad()
        out = model.train()(images, text)
        loss = out["caption_loss_sum"] + (out["image_features"] * out["text_features"]).sum() * out["logit_scale"].sum()
        loss.backward()
        results.append((loss.detach(), out["caption_tokens"], model.encode_text(text),
                        [p.grad.clone() for p in model.parameters()]))
    (full_loss, full_tokens, full_text, full_grads), (loss, tokens, text_features, grads) = results
    torch.testing.assert_close(loss, full_loss)
    assert int(tokens) == int(full_tokens)
    torch.testing.assert_close(text_features, full_text)
    for full, trimmed in zip(full_grads, grads):
        torch.testing.assert_close(trimmed, full, rtol=1e-4, atol=1e-5)


def test_every_parameter_gets_a_gradient(model):
    images, text = make_batch(model.cfg)
    out = model.train()(images, text)
    (out["caption_loss_sum"] + (out["image_features"] * out["text_features"]).sum() * out["logit_scale"]).sum().backward()
    missing = [name for name, p in model.named_parameters() if p.grad is None]
    assert not missing


@pytest.mark.parametrize("weights", [(1.0, 0.0), (0.0, 2.0)], ids=["contrastive_only", "captioning_only"])
def test_a_single_objective_forward_gives_the_full_forwards_loss_and_gradients(model, weights):
    """The ablations' forward (CoCaLoss.model_kwargs) skips the dropped objective's modules: its loss and every
    gradient equal those of the full forward with that loss weighted 0, and the modules only the dropped
    objective uses get no gradient at all (DeepSpeed then never reduces it)."""
    from megacoca.losses import CoCaLoss

    loss_fn = CoCaLoss(*weights)
    images, text = make_batch(model.cfg)
    text[:, 7:] = PAD  # a trimmed tail: the captioning forward keeps only what the caption needs
    runs = []
    for kwargs in ({}, loss_fn.model_kwargs):
        model.zero_grad(set_to_none=True)
        out = model.train()(images, text, **kwargs)
        loss, parts = loss_fn(out)
        loss.backward()
        runs.append((out, loss.detach(), {n: p.grad for n, p in model.named_parameters()}))
    (full_out, full_loss, full_grads), (out, loss, grads) = runs
    torch.testing.assert_close(loss, full_loss)
    dropped = {"caption_loss_sum", "caption_tokens"} if weights[1] == 0 else {"image_features", "text_features"}
    assert set(out) == set(full_out) - dropped
    for name, grad in grads.items():
        if grad is None:
            assert full_grads[name] is None or not full_grads[name].any(), name
        else:
            torch.testing.assert_close(grad, full_grads[name], rtol=1e-5, atol=1e-6, msg=name)
    without = {name for name, grad in grads.items() if grad is None}
    if weights[1] == 0:
        assert without == {n for n, _ in model.named_parameters() if n.startswith(("decoder.", "caption_head."))}
    else:  # the contrastive side: the paper's contrastive pooler, the projections, the text's CLS-only outputs
        required = {"logit_scale", "image_pooler.projection.weight", "text.outputs.projection.weight"}
        if model.cfg.pooler_layout == "paper":
            required |= {n for n, _ in model.named_parameters() if n.startswith("image_pooler.contrastive_pooler.")}
        allowed = required | {n for n, _ in model.named_parameters()
                              if n.startswith(("image_pooler.ln_post.", "text.outputs."))}
        assert required <= without <= allowed, without


def test_a_forward_needs_one_objective(model):
    images, text = make_batch(model.cfg)
    with pytest.raises(ValueError, match="contrastive or the captioning"):
        model(images, text, contrastive=False, captioning=False)


def test_tied_word_embeddings_share_one_parameter():
    model = CoCa(tiny_config(tie_word_embeddings=True))
    assert model.caption_head.weight is model.text.embed.token_embedding.weight
    untied = CoCa(tiny_config())
    assert model.num_params() == untied.num_params() - 50 * 32


def test_text_longer_than_context_is_a_clear_error():
    model = CoCa(tiny_config())
    images, text = make_batch(model.cfg, length=13)
    with pytest.raises(ValueError, match="exceeds the model's 13"):
        model(images, text)


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(image_size=30), "not a multiple of patch_size"),
        (dict(vision_heads=3), "vision_width 32 is not divisible"),
        (dict(pooler_layout="both"), "pooler_layout"),
        (dict(kernels="cuda"), "kernels must be"),
        (dict(pad_id=50), "pad_id 50"),
        (dict(decoder_layers=0), "decoder_layers must be >= 1"),
        (dict(pooler_layout="open_clip", pooler_cascade=False), "pooler_cascade=false is a variant of the paper"),
        (dict(pooler_query_std=0.0), "pooler_query_std must be > 0"),
    ],
)
def test_config_errors_are_one_line_and_name_the_field(changes, message):
    with pytest.raises(ValueError, match=message) as error:
        tiny_config(**changes)
    assert "\n" not in str(error.value)


def test_config_round_trips_through_dict():
    cfg = get_flavor("coca_base")
    assert type(cfg).from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown keys"):
        CoCaConfig.from_dict({**cfg.to_dict(), "widht": 3})
