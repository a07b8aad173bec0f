"""Tokenizers: SentencePiece (trained with `megacoca tokenizer train`) and open_clip's CLIP BPE.

Both give the same interface (the `TokenizerLike` protocol in docs/design.md):
`encode(texts) -> LongTensor (B, context_length)` laid out as `bos, tokens..., eos, pad, pad, ...`; when the
text is too long the tokens are truncated and eos is kept as the last position. `decode(ids) -> str` stops
at the first eos and skips bos/pad. Properties: `vocab_size`, `pad_id`, `bos_id`, `eos_id`, `context_length`.

SentencePiece models trained here use fixed special ids: pad=0, unk=1, bos=2, eos=3 (pad 0 matches
open_clip's CLIP BPE, so `text != 0` is the non-pad mask for either tokenizer).
"""

from __future__ import annotations

import os
from typing import Iterable, Protocol, Sequence, runtime_checkable

import sentencepiece as spm
import torch

from megacoca.config.overrides import ConfigError

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
DEFAULT_CONTEXT_LENGTH = 77
CLIP_BPE_CONTEXT_LENGTH = 76  # open_clip's CoCa text context (it appends its CLS itself)


@runtime_checkable
class TokenizerLike(Protocol):
    context_length: int

    def encode(self, texts: Sequence[str]) -> torch.Tensor: ...

    def decode(self, ids) -> str: ...

    @property
    def vocab_size(self) -> int: ...

    @property
    def pad_id(self) -> int: ...

    @property
    def bos_id(self) -> int: ...

    @property
    def eos_id(self) -> int: ...


def _pack(token_lists: Iterable[list[int]], context_length: int, bos: int, eos: int, pad: int) -> torch.Tensor:
    """Lay out `bos, tokens, eos, pad...`, truncating tokens so that eos always fits."""
    token_lists = list(token_lists)
    out = torch.full((len(token_lists), context_length), pad, dtype=torch.long)
    room = context_length - 2
    for row, tokens in enumerate(token_lists):
        seq = [bos] + list(tokens[:room]) + [eos]
        out[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
    return out


def _ids_to_list(ids) -> list[int]:
    if isinstance(ids, torch.Tensor):
        if ids.dim() != 1:
            raise ValueError(f"decode takes one sequence (1-D), got shape {tuple(ids.shape)}; use batch_decode")
        return [int(i) for i in ids.tolist()]
    return [int(i) for i in ids]


class _Base:
    context_length: int

    def __call__(self, texts) -> torch.Tensor:
        return self.encode(texts)

    def _strip(self, ids) -> list[int]:
        out = []
        for token in _ids_to_list(ids):
            if token == self.eos_id:
                break
            if token in (self.bos_id, self.pad_id):
                continue
            out.append(token)
        return out

    def batch_decode(self, ids) -> list[str]:
        """Decode a (B, L) tensor or a list of sequences."""
        return [self.decode(row) for row in ids]


class Tokenizer(_Base):
    """A SentencePiece tokenizer (pad 0, unk 1, bos 2, eos 3 when trained by `train_sentencepiece`).

    Picklable (workers of the data loader get a copy): the model's bytes travel, not the C++ object.
    """

    def __init__(self, model_path: str | os.PathLike, context_length: int = DEFAULT_CONTEXT_LENGTH):
        model_path = os.fspath(model_path)
        if os.path.isdir(model_path):
            raise ValueError(f"tokenizer model {model_path} is a directory, not a SentencePiece .model file")
        if not os.path.isfile(model_path):
            raise FileNotFoundError(f"tokenizer model not found: {model_path}")
        if context_length < 2:
            raise ValueError(f"context_length must be >= 2 (bos + eos), got {context_length}")
        self.model_path = model_path
        self.context_length = int(context_length)
        with open(model_path, "rb") as f:
            self._proto = f.read()
        try:
            self._sp = spm.SentencePieceProcessor(model_proto=self._proto)
        except RuntimeError:  # the protobuf parse failed: SentencePiece says only "INTERNAL: ... ParseFromArray"
            raise ValueError(f"{model_path} is not a SentencePiece model (it does not parse as one); train one with "
                             "`megacoca tokenizer train` or use 'clip-bpe'") from None
        self._check_specials()

    def _check_specials(self):
        for name in ("pad_id", "bos_id", "eos_id"):
            if getattr(self._sp, name)() < 0:
                raise ValueError(
                    f"{self.model_path}: SentencePiece model has no {name.split('_')[0]} piece; train it with "
                    "`megacoca tokenizer train` (pad=0 unk=1 bos=2 eos=3)"
                )

    def __getstate__(self):
        state = self.__dict__.copy()
        state.pop("_sp", None)
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._sp = spm.SentencePieceProcessor(model_proto=self._proto)

    def __repr__(self) -> str:
        return f"Tokenizer({self.model_path!r}, vocab_size={self.vocab_size}, context_length={self.context_length})"

    @property
    def vocab_size(self) -> int:
        return int(self._sp.get_piece_size())

    @property
    def pad_id(self) -> int:
        return int(self._sp.pad_id())

    @property
    def bos_id(self) -> int:
        return int(self._sp.bos_id())

    @property
    def eos_id(self) -> int:
        return int(self._sp.eos_id())

    def encode(self, texts) -> torch.Tensor:
        if isinstance(texts, str):
            texts = [texts]
        ids = self._sp.encode(list(texts), out_type=int)
        return _pack(ids, self.context_length, self.bos_id, self.eos_id, self.pad_id)

    def decode(self, ids) -> str:
        return self._sp.decode(self._strip(ids))


SentencePieceTokenizer = Tokenizer


class ClipBpeTokenizer(_Base):
    """open_clip's CLIP BPE (bundled in the open_clip wheel): sot 49406, eot 49407, pad 0, context 76.

    `encode` gives exactly open_clip's `SimpleTokenizer(context_length)(texts)` (lower-cased, cleaned).
    open_clip is imported lazily; install the `open_clip` extra to use it.
    """

    def __init__(self, context_length: int = CLIP_BPE_CONTEXT_LENGTH):
        if context_length < 2:
            raise ValueError(f"context_length must be >= 2 (sot + eot), got {context_length}")
        self.context_length = int(context_length)
        self._tok = None
        self._load()

    def _load(self):
        try:
            from open_clip.tokenizer import SimpleTokenizer  # optional: the open_clip extra
        except ImportError as error:  # pragma: no cover - depends on the environment
            raise ImportError("the clip-bpe tokenizer needs open_clip: pip install 'megacoca[open_clip]'") from error
        self._tok = SimpleTokenizer(context_length=self.context_length)

    def __getstate__(self):
        return {"context_length": self.context_length}

    def __setstate__(self, state):
        self.context_length = state["context_length"]
        self._load()

    def __repr__(self) -> str:
        return f"ClipBpeTokenizer(context_length={self.context_length})"

    @property
    def vocab_size(self) -> int:
        return len(self._tok.encoder)

    @property
    def pad_id(self) -> int:
        return 0

    @property
    def bos_id(self) -> int:
        return int(self._tok.sot_token_id)

    @property
    def eos_id(self) -> int:
        return int(self._tok.eot_token_id)

    def encode(self, texts) -> torch.Tensor:
        if isinstance(texts, str):
            texts = [texts]
        ids = [self._tok.encode(text) for text in texts]
        return _pack(ids, self.context_length, self.bos_id, self.eos_id, self.pad_id)

    def decode(self, ids) -> str:
        return self._tok.decode(self._strip(ids)).strip()


def load_tokenizer(spec: str, context_length: int | None = None):
    """`"clip-bpe"` -> ClipBpeTokenizer (default context 76); a SentencePiece `.model` path -> Tokenizer
    (default context 77). A missing file raises FileNotFoundError naming the path."""
    spec = os.fspath(spec)
    if spec in ("clip-bpe", "clip_bpe", "clip"):
        return ClipBpeTokenizer(context_length or CLIP_BPE_CONTEXT_LENGTH)
    return Tokenizer(spec, context_length or DEFAULT_CONTEXT_LENGTH)


def open_tokenizer(spec: str, context_length: int | None = None, where: str | None = None):
    """`load_tokenizer`, with any failure to read `spec` as one ConfigError line (prefixed with `where`: the config
    key or argument that named it)."""
    prefix = f"{where}: " if where else ""
    if not spec:
        raise ConfigError(f"{prefix}no tokenizer given (empty): use 'clip-bpe' or the path of a SentencePiece .model")
    try:
        return load_tokenizer(spec, context_length)
    except (FileNotFoundError, ValueError, ImportError, OSError) as error:
        raise ConfigError(prefix + " ".join(str(error).split())) from None


def train_sentencepiece(
    sentences: Iterable[str],
    output_prefix: str | os.PathLike,
    vocab_size: int,
    model_type: str = "bpe",
    character_coverage: float = 0.9995,
    max_sentences: int = 2_000_000,
) -> str:
    """Train a SentencePiece model over `sentences`; writes PREFIX.model and PREFIX.vocab, returns the
    .model path. Special ids: pad 0, unk 1, bos 2, eos 3. `vocab_size` is a soft limit (a corpus with
    few distinct pieces, like synth-shapes, gets a smaller vocabulary instead of an error)."""
    output_prefix = os.fspath(output_prefix)
    if output_prefix.endswith(".model"):
        output_prefix = output_prefix[: -len(".model")]
    parent = os.path.dirname(output_prefix)
    if parent:
        os.makedirs(parent, exist_ok=True)

    def bounded():
        for index, sentence in enumerate(sentences):
            if index >= max_sentences:
                return
            sentence = sentence.strip()
            if sentence:
                yield sentence

    spm.SentencePieceTrainer.train(
        sentence_iterator=bounded(),
        model_prefix=output_prefix,
        vocab_size=int(vocab_size),
        model_type=model_type,
        character_coverage=character_coverage,
        pad_id=PAD_ID,
        unk_id=UNK_ID,
        bos_id=BOS_ID,
        eos_id=EOS_ID,
        pad_piece="<pad>",
        unk_piece="<unk>",
        bos_piece="<s>",
        eos_piece="</s>",
        hard_vocab_limit=False,
        num_threads=max(1, min(os.cpu_count() or 1, 16)),
        minloglevel=2,
    )
    return output_prefix + ".model"
