"""Global negatives' arithmetic on one process (megacoca.schedules.negatives), and the step's caption tokens
(megacoca.losses.StepTokens): the cached gradients, applied micro-batch by micro-batch as a schedule applies them
(DeepSpeed's division by the micro-batch count included), give the gradient of the contrastive loss over the whole
batch; each forward piece's generators are seeded the same in both passes."""

import torch
import torch.nn.functional as F

from megacoca.losses import StepTokens, caption_loss, caption_token_count, contrastive_loss
from megacoca.schedules.negatives import GlobalNegatives, RandomPieces


def _towers(seed=0, width=6, embed=4):
    torch.manual_seed(seed)
    return torch.nn.Linear(width, embed), torch.nn.Linear(width, embed), torch.nn.Parameter(torch.tensor([2.0]))


def _outputs(image_tower, text_tower, scale, images, texts):
    return {"image_features": F.normalize(image_tower(images), dim=-1),
            "text_features": F.normalize(text_tower(texts), dim=-1), "logit_scale": scale.exp()}


def test_cached_gradients_equal_the_whole_batch_gradient():
    image_tower, text_tower, scale = _towers()
    images, texts, m = torch.randn(12, 6), torch.randn(12, 6), 4
    params = [*image_tower.parameters(), *text_tower.parameters(), scale]
    whole = _outputs(image_tower, text_tower, scale, images, texts)
    expected_loss = contrastive_loss(whole["image_features"], whole["text_features"], whole["logit_scale"])
    expected = torch.autograd.grad(expected_loss, params)

    negatives = GlobalNegatives(m, None, RandomPieces(0, 0))
    negatives.begin()
    with torch.no_grad():
        for k in range(m):
            negatives.add(_outputs(image_tower, text_tower, scale, images[3 * k:3 * k + 3], texts[3 * k:3 * k + 3]))
    negatives.solve()
    total = [torch.zeros_like(p) for p in params]
    for k in range(m):
        out = _outputs(image_tower, text_tower, scale, images[3 * k:3 * k + 3], texts[3 * k:3 * k + 3])
        loss = negatives.contrastive(k, out)
        torch.testing.assert_close(loss.detach(), expected_loss.detach())
        for acc, grad in zip(total, torch.autograd.grad(loss / m, params)):  # DeepSpeed divides by m
            acc += grad
    for got, want in zip(total, expected):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert float(negatives.replay_error) == 0.0


def test_a_wrong_micro_batch_gradient_is_wrong():
    """The check above has teeth: k+1's cached gradient applied to k gives another gradient."""
    image_tower, text_tower, scale = _towers(1)
    images, texts = torch.randn(8, 6), torch.randn(8, 6)
    negatives = GlobalNegatives(2, None, RandomPieces(0, 0))
    negatives.begin()
    with torch.no_grad():
        for k in range(2):
            negatives.add(_outputs(image_tower, text_tower, scale, images[4 * k:4 * k + 4], texts[4 * k:4 * k + 4]))
    negatives.solve()
    negatives.grads.reverse()
    out = _outputs(image_tower, text_tower, scale, images[:4], texts[:4])
    wrong = torch.autograd.grad(negatives.contrastive(0, out), image_tower.weight)[0]
    negatives.grads.reverse()
    out = _outputs(image_tower, text_tower, scale, images[:4], texts[:4])
    right = torch.autograd.grad(negatives.contrastive(0, out), image_tower.weight)[0]
    assert not torch.allclose(wrong, right)


def test_pieces_draw_the_same_in_both_passes_and_differ_between_pieces():
    pieces = RandomPieces(seed=3, dp_rank=1)
    with pieces.piece(7, "F", 2):
        first = torch.rand(5)
    torch.rand(100)  # the outer generator moves on; the piece does not care
    with pieces.piece(7, "F", 2):
        again = torch.rand(5)
    with pieces.piece(7, "T", 2):
        text = torch.rand(5)
    with pieces.piece(7, "F", 3):
        other = torch.rand(5)
    assert torch.equal(first, again)
    assert not torch.equal(first, text) and not torch.equal(first, other)
    assert RandomPieces(3, 0).seed_of(7, "F", 2) != pieces.seed_of(7, "F", 2)  # dp ranks draw apart
    state = torch.get_rng_state()
    with pieces.piece(1, "F", 0):
        torch.rand(3)
    assert torch.equal(state, torch.get_rng_state())  # the global generator is left as it was


def test_step_tokens_weigh_every_token_of_the_step_alike():
    pad = 0
    texts = [torch.tensor([[1, 5, 6, 2, 0, 0]]), torch.tensor([[1, 7, 2, 0, 0, 0], [1, 8, 9, 9, 9, 2]])]
    counts = [int(caption_token_count(t, pad)) for t in texts]
    assert counts == [3, 2 + 5]
    tokens = StepTokens.count(sum(caption_token_count(t, pad) for t in texts), micro_batches=2)
    sums = [torch.tensor(6.0), torch.tensor(14.0)]  # each micro-batch's summed token loss
    step_loss = sum(tokens.loss(s) for s in sums) / 2  # DeepSpeed's mean over the micro-batches
    torch.testing.assert_close(step_loss, torch.tensor(20.0 / 10))  # the mean over all 10 tokens


def test_one_micro_batch_is_bit_for_bit_the_old_caption_loss():
    summed, count = torch.tensor(17.123456), torch.tensor(7)
    tokens = StepTokens.count(count, micro_batches=1)
    assert torch.equal(tokens.loss(summed), caption_loss(summed, count))
