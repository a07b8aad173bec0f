import pickle

import pytest
import torch

from megacoca.data.tokenizer import ClipBpeTokenizer, Tokenizer, load_tokenizer, train_sentencepiece

CAPTIONS = [f"a {size} {color} {shape} {rel} a {color2} {shape2}"
            for size in ("small", "large") for color in ("red", "green", "blue") for shape in ("circle", "square")
            for rel in ("left of", "above") for color2 in ("yellow", "purple") for shape2 in ("triangle", "cross")]


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory):
    prefix = tmp_path_factory.mktemp("tok") / "shapes"
    return train_sentencepiece(CAPTIONS * 4, prefix, vocab_size=120)


def test_sentencepiece_layout_and_round_trip(sp_model):
    tok = load_tokenizer(sp_model, 24)
    assert isinstance(tok, Tokenizer)
    assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.context_length) == (0, 2, 3, 24)
    assert 30 < tok.vocab_size <= 120
    texts = ["a small red circle left of a yellow cross", "a large blue square"]
    ids = tok.encode(texts)
    assert ids.shape == (2, 24) and ids.dtype == torch.long
    for row, text in zip(ids, texts):
        length = int((row != tok.pad_id).sum())
        assert row[0] == tok.bos_id and row[length - 1] == tok.eos_id and (row[length:] == tok.pad_id).all()
        assert tok.decode(row) == text
    assert tok.batch_decode(ids) == texts
    assert tok.decode([tok.bos_id] + tok.encode(["a red"])[0, 1:].tolist() + [5, 6]) == "a red"  # stops at eos
    assert torch.equal(tok(texts), ids)


def test_truncation_keeps_eos_last(sp_model):
    tok = load_tokenizer(sp_model, 6)
    ids = tok.encode(["a small red circle left of a yellow cross"])[0]
    assert ids.tolist()[0] == tok.bos_id and ids.tolist()[-1] == tok.eos_id and tok.pad_id not in ids.tolist()
    assert "a small red circle left of a yellow cross".startswith(tok.decode(ids))


def test_pickles_for_loader_workers(sp_model):
    tok = load_tokenizer(sp_model, 16)
    clone = pickle.loads(pickle.dumps(tok))
    assert torch.equal(clone.encode(CAPTIONS[:3]), tok.encode(CAPTIONS[:3]))


def test_missing_model_is_a_one_line_error(tmp_path):
    missing = str(tmp_path / "nope.model")
    with pytest.raises(FileNotFoundError) as info:
        load_tokenizer(missing, 32)
    assert str(info.value) == f"tokenizer model not found: {missing}"


def test_clip_bpe_matches_open_clip():
    from open_clip.tokenizer import SimpleTokenizer

    tok = load_tokenizer("clip-bpe")
    assert isinstance(tok, ClipBpeTokenizer)
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.context_length, tok.vocab_size) == (49406, 49407, 0, 76, 49408)
    texts = ["A small red circle, left of a BLUE square!", "word " * 100]
    ids = tok.encode(texts)
    assert torch.equal(ids, SimpleTokenizer(context_length=76)(texts))
    assert ids[1, -1] == tok.eos_id
    assert tok.decode(ids[0]) == "a small red circle , left of a blue square !"
    assert torch.equal(pickle.loads(pickle.dumps(tok)).encode(texts), ids)
    assert load_tokenizer("clip-bpe", 32).encode(["x"]).shape == (1, 32)
