"""Zero-shot: prompt expansion, template averaging and top-k accuracy on hand-made embeddings."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from megacoca.eval.zeroshot import class_embeddings, class_prompts, topk_accuracy, zeroshot_logits


class WordTokenizer:
    """Whitespace tokenizer over a growing vocabulary: bos 1, eos 2, pad 0."""

    pad_id, bos_id, eos_id = 0, 1, 2

    def __init__(self, context_length=12):
        self.context_length = context_length
        self.vocab = {}

    def encode(self, texts):
        out = torch.zeros(len(texts), self.context_length, dtype=torch.long)
        for row, text in enumerate(texts):
            ids = [1] + [self.vocab.setdefault(w, len(self.vocab) + 3) for w in text.split()] + [2]
            out[row, : len(ids)] = torch.tensor(ids)
        return out


class BagOfWords(nn.Module):
    """encode_text = normalised sum of fixed word vectors: lets the test predict the class embeddings."""

    def __init__(self, vectors):
        super().__init__()
        self.table = nn.Embedding.from_pretrained(vectors)

    def encode_text(self, text, normalize=True):
        embedding = self.table(text).sum(dim=1)
        return F.normalize(embedding, dim=-1) if normalize else embedding


def test_class_prompts_from_names_and_fields():
    assert class_prompts(["cat"], ["a {}", "photo of {name}"]) == [["a cat", "photo of cat"]]
    assert class_prompts([{"color": "red", "shape": "circle"}], ["a {color} {shape}"]) == [["a red circle"]]
    with pytest.raises(ValueError):
        class_prompts(["cat"], [])


def test_class_embeddings_average_normalised_template_embeddings():
    tokenizer = WordTokenizer()
    tokenizer.encode(["a red blue x"])  # ids: a 3, red 4, blue 5, x 6
    vectors = torch.zeros(8, 4)
    vectors[3] = torch.tensor([0.0, 0.0, 0.0, 1.0])
    vectors[4] = torch.tensor([1.0, 0.0, 0.0, 0.0])
    vectors[5] = torch.tensor([0.0, 1.0, 0.0, 0.0])
    vectors[6] = torch.tensor([0.0, 0.0, 3.0, 0.0])
    model = BagOfWords(vectors)
    features = class_embeddings(model, tokenizer, ["red", "blue"], ["a {}", "x {}"], batch_size=3)
    one = F.normalize(torch.tensor([1.0, 0, 0, 1]), dim=0)
    two = F.normalize(torch.tensor([1.0, 0, 3, 0]), dim=0)
    expected_red = F.normalize(one + two, dim=0)
    assert torch.allclose(features[0], expected_red, atol=1e-6)
    assert torch.allclose(features.norm(dim=-1), torch.ones(2))


def test_topk_accuracy():
    logits = torch.tensor([[0.9, 0.1, 0.0], [0.2, 0.5, 0.7], [0.3, 0.2, 0.1]])
    labels = torch.tensor([0, 1, 2])
    assert topk_accuracy(logits, labels, (1, 2, 3)) == pytest.approx({1: 1 / 3, 2: 2 / 3, 3: 1.0})


def test_topk_ties_go_against_the_label():
    assert topk_accuracy(torch.zeros(4, 24), torch.arange(4), (1,)) == {1: 0.0}


def test_zeroshot_on_hand_made_embeddings():
    torch.manual_seed(0)
    classes = F.normalize(torch.randn(24, 16), dim=-1)
    labels = torch.arange(96) % 24
    images = F.normalize(classes[labels] + 0.05 * torch.randn(96, 16), dim=-1)
    assert topk_accuracy(zeroshot_logits(images, classes), labels, (1,))[1] == 1.0


def test_caption_likelihood_logits_are_the_mean_template_log_likelihood():
    """Each (image, class) score is minus the model's own summed caption loss of that prompt given that image,
    averaged over templates, whatever the image batching."""
    from megacoca.config.model import CoCaConfig
    from megacoca.eval.zeroshot import caption_likelihood_logits
    from megacoca.models.coca import CoCa

    tokenizer = WordTokenizer(context_length=8)
    classes, templates = ["red", "blue", "green"], ["a {}", "a photo of one {}"]
    tokenizer.encode(["a photo of one", "red blue green"])
    cfg = CoCaConfig(image_size=16, patch_size=8, vision_width=16, vision_layers=1, vision_heads=2, vision_mlp_dim=32,
                     caption_queries=4, pooler_heads=2, vocab_size=12, context_length=8, text_width=16,
                     text_heads=2, text_mlp_dim=32, text_layers=1, decoder_layers=1, embed_dim=8, kernels="torch")
    torch.manual_seed(0)
    model = CoCa(cfg).eval()
    images = torch.randn(5, 3, 16, 16)
    scores = caption_likelihood_logits(model, tokenizer, images, classes, templates, batch_size=2)
    assert scores.shape == (5, 3)
    for i in range(5):
        for c, name in enumerate(classes):
            text = tokenizer.encode([t.format(name) for t in templates])
            with torch.no_grad():
                per_template = [float(model(images[i:i + 1], text[k:k + 1])["caption_loss_sum"]) for k in range(2)]
            assert scores[i, c].item() == pytest.approx(-sum(per_template) / 2, rel=1e-4, abs=1e-4)
