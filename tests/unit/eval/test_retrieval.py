"""recall@k on hand-made embeddings: exact pairs, duplicated captions, ties and collapse."""

import pytest
import torch
import torch.nn.functional as F

from megacoca.eval.retrieval import best_positive_rank, caption_positives, recall_at_k, retrieval_metrics


def test_perfect_pairs_give_recall_one():
    features = torch.eye(6)
    metrics = retrieval_metrics(features, features)
    assert all(value == 1.0 for value in metrics.values())
    assert set(metrics) == {f"{d}_r{k}" for d in ("i2t", "t2i") for k in (1, 5, 10)}


def test_ranks_of_a_hand_made_similarity():
    # query 0: positive is best; query 1: two negatives above; query 2: one negative above
    similarity = torch.tensor([[0.9, 0.1, 0.2], [0.8, 0.1, 0.7], [0.1, 0.6, 0.5]])
    positives = torch.eye(3, dtype=torch.bool)
    assert best_positive_rank(similarity, positives).tolist() == [0, 2, 1]
    assert recall_at_k(similarity, positives, (1, 2, 3)) == pytest.approx({1: 1 / 3, 2: 2 / 3, 3: 1.0})


def test_image_to_text_and_text_to_image_are_not_the_same_direction():
    # similarity [[0.5, 0.6], [0.0, 0.9]]: image 0 prefers text 1, but each text prefers its own image
    image = torch.eye(2)
    text = torch.tensor([[0.5, 0.0], [0.6, 0.9]])
    metrics = retrieval_metrics(image, text, ks=(1,))
    assert metrics["i2t_r1"] == 0.5 and metrics["t2i_r1"] == 1.0


def test_identical_captions_are_positives_of_each_other():
    # images 0 and 1 share a caption; image 0 retrieves text 1 first: a hit only with caption positives
    image = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    text = torch.tensor([[0.9, 0.1], [1.0, 0.0], [0.0, 1.0]])
    text = F.normalize(text, dim=-1)
    captions = ["a red circle", "a red circle", "a blue square"]
    assert caption_positives(captions).tolist() == [[True, True, False], [True, True, False], [False, False, True]]
    assert retrieval_metrics(image, text, captions, ks=(1,))["i2t_r1"] == 1.0
    assert retrieval_metrics(image, text, None, ks=(1,))["i2t_r1"] < 1.0


def test_ties_count_against_the_query_so_collapse_scores_zero():
    collapsed = torch.ones(5, 4) / 2
    metrics = retrieval_metrics(collapsed, collapsed, ks=(1, 4, 5))
    assert metrics["i2t_r1"] == 0.0 and metrics["t2i_r4"] == 0.0
    assert metrics["i2t_r5"] == 1.0  # with k = N every query hits


def test_chunked_recall_equals_unchunked():
    torch.manual_seed(0)
    image = F.normalize(torch.randn(50, 8), dim=-1)
    text = F.normalize(image + 0.5 * torch.randn(50, 8), dim=-1)
    similarity = image @ text.T
    positives = torch.eye(50, dtype=torch.bool)
    assert recall_at_k(similarity, positives, chunk=7) == recall_at_k(similarity, positives, chunk=1024)


def test_mismatched_inputs_raise():
    with pytest.raises(ValueError, match="3 images but 2 texts"):
        retrieval_metrics(torch.eye(3), torch.ones(2, 3))
    with pytest.raises(ValueError, match="at least one positive"):
        best_positive_rank(torch.zeros(2, 2), torch.zeros(2, 2, dtype=torch.bool))


def test_class_level_retrieval_counts_any_caption_of_the_class():
    # image 0 retrieves text 1 first: a different caption of the same class
    image = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    text = F.normalize(torch.tensor([[0.9, 0.1], [1.0, 0.0], [0.0, 1.0]]), dim=-1)
    captions = ["a red circle", "a photo of a red circle", "a blue square"]
    assert retrieval_metrics(image, text, captions, ks=(1,))["i2t_r1"] < 1.0
    metrics = retrieval_metrics(image, text, captions, ks=(1,), groups=[0, 0, 1], prefix="class_")
    assert metrics == {"class_i2t_r1": 1.0, "class_t2i_r1": 1.0}
