"""Caption generation with a KV cache: greedy, beam search and top-k / top-p sampling.

The image towers run once. Each decoded token then runs through the unimodal text blocks
(`TextEncoder.forward_cached`, one `KVCache` per block) and the multimodal decoder (a self-attention cache and a
cross-attention cache per layer; the cross-attention keys and values of the image tokens are computed on the
first step and reused), so a step costs one token's worth of compute instead of a forward over the whole
prefix, as open_clip's `generate` does.

Token rules, shared by every strategy (they match open_clip's generate and HuggingFace's logits processors):
- the output is `bos, new tokens..., eos, pad, pad...` (B, T), T <= 1 + max_new_tokens, shorter when every row
  finished early;
- a row finishes on eos, and also on pad when `stop_on_pad` (open_clip's rule: its CLIP BPE pad id 0 is a real
  token, "!", that the model can emit; the row then reads as text cut off at that point);
- the first `min_new_tokens` new tokens are never eos (open_clip's `min_seq_len` is `min_new_tokens + 1`);
- `repetition_penalty` divides positive / multiplies negative scores of every token already in the row (bos
  included), as CTRL and HuggingFace do.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from megacoca.models.coca.layers import KVCache

STRATEGIES = ("greedy", "beam", "sample")


class CachedDecoder:
    """Runs the text and multimodal decoder one step at a time over a fixed set of image rows."""

    def __init__(self, model, image_tokens: torch.Tensor) -> None:
        self.model = model
        self.image_tokens = image_tokens
        self.text_caches = [KVCache() for _ in model.text.blocks]
        self.self_caches = [KVCache() for _ in model.decoder.layers]
        self.cross_caches = [KVCache() for _ in model.decoder.layers]
        self.length = 0

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (N, T), the next T tokens of every row -> fp32 logits (N, V) of the next token."""
        tokens_out = self.model.text.forward_cached(tokens, self.text_caches, self.length)
        caches = list(zip(self.self_caches, self.cross_caches))
        hidden = self.model.decoder(tokens_out, self.image_tokens, caches=caches)
        self.length += tokens.shape[1]
        return self.model.caption_head(hidden[:, -1]).float()

    def reorder(self, index: torch.Tensor, cross: bool = True) -> None:
        """Keep rows `index` (in that order) of every cache. `cross=False` leaves the cross-attention caches
        alone, valid when `index` only permutes rows that share an image (beams of one batch item)."""
        for cache in self.text_caches + self.self_caches:
            cache.reorder(index)
        if cross:
            for cache in self.cross_caches:
                cache.reorder(index)
            self.image_tokens = self.image_tokens.index_select(0, index)


def _process_scores(
    scores: torch.Tensor, seqs: torch.Tensor, new_tokens: int, *, eos_id: int, min_new_tokens: int,
    repetition_penalty: float,
) -> torch.Tensor:
    """Repetition penalty and the minimum length, on scores (N, V) for rows seqs (N, t)."""
    if repetition_penalty != 1.0:
        seen = scores.gather(1, seqs)
        seen = torch.where(seen < 0, seen * repetition_penalty, seen / repetition_penalty)
        scores = scores.scatter(1, seqs, seen)
    if new_tokens < min_new_tokens:
        scores = scores.clone()
        scores[:, eos_id] = -math.inf
    return scores


def _filter_top_k_top_p(scores: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Keep the top_k highest scores (0: all), then the smallest set whose probability reaches top_p."""
    if top_k > 0:
        kth = scores.topk(min(top_k, scores.shape[-1]), dim=-1).values[:, -1:]
        scores = scores.masked_fill(scores < kth, -math.inf)
    if top_p < 1.0:
        sorted_scores, order = scores.sort(dim=-1, descending=True)
        probs = sorted_scores.softmax(dim=-1)
        before = probs.cumsum(dim=-1) - probs  # probability mass of the tokens ranked above each one
        remove_sorted = before >= top_p
        remove_sorted[:, 0] = False  # always keep the most likely token
        remove = remove_sorted.scatter(1, order, remove_sorted)
        scores = scores.masked_fill(remove, -math.inf)
    return scores


def _pad_rows(rows: list[torch.Tensor], pad_id: int) -> torch.Tensor:
    width = max(row.numel() for row in rows)
    out = rows[0].new_full((len(rows), width), pad_id)
    for index, row in enumerate(rows):
        out[index, : row.numel()] = row
    return out


@torch.no_grad()
def generate(
    model,
    images: torch.Tensor,
    *,
    max_new_tokens: int = 30,
    strategy: str = "greedy",
    num_beams: int = 4,
    top_k: int = 0,
    top_p: float = 1.0,
    temperature: float = 1.0,
    min_new_tokens: int = 0,
    repetition_penalty: float = 1.0,
    length_penalty: float = 1.0,
    bos_id: int,
    eos_id: int,
    pad_id: int | None = None,
    stop_on_pad: bool = True,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Captions for images (B, 3, H, W) -> LongTensor (B, T): bos first, eos, then pad_id.

    strategy "greedy": argmax. "sample": softmax(scores / temperature) after top_k (0: off) and top_p (1.0: off),
    drawn with `generator` (pass a seeded torch.Generator for reproducible captions). "beam": `num_beams` beams
    per image scored by summed log-probabilities; a finished hypothesis ranks by score / length**length_penalty
    (length counts the new tokens, eos included; 0.0 ranks by raw log-probability); an image stops once it
    has num_beams finished hypotheses and its best live beam cannot beat the worst of them (exact for
    length_penalty 0, HuggingFace's heuristic otherwise). pad_id defaults to the model's.
    The model runs in eval mode under no_grad; its training flag is restored afterwards.
    """
    pad_id = model.cfg.pad_id if pad_id is None else pad_id
    _check_options(model.cfg, strategy, max_new_tokens, num_beams, temperature, top_p)
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        images = images.to(device)
        _, image_tokens = model.image_stage(images)
        options = dict(
            max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens, repetition_penalty=repetition_penalty,
            bos_id=bos_id, eos_id=eos_id, pad_id=pad_id, stop_on_pad=stop_on_pad,
        )
        if strategy == "beam":
            return _beam_search(model, image_tokens, num_beams=num_beams, length_penalty=length_penalty, **options)
        return _greedy_or_sample(
            model, image_tokens, sample=strategy == "sample", top_k=top_k, top_p=top_p, temperature=temperature,
            generator=generator, **options,
        )
    finally:
        model.train(was_training)


def _check_options(cfg, strategy: str, max_new_tokens: int, num_beams: int, temperature: float, top_p: float) -> None:
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if max_new_tokens > cfg.context_length:
        raise ValueError(
            f"max_new_tokens {max_new_tokens} exceeds the model's context_length {cfg.context_length} "
            "(the positions the text decoder has embeddings for)"
        )
    if strategy == "beam" and num_beams < 1:
        raise ValueError(f"num_beams must be >= 1, got {num_beams}")
    if strategy == "sample" and temperature <= 0:
        raise ValueError(f"temperature must be > 0 for sampling, got {temperature}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")


def _greedy_or_sample(
    model, image_tokens, *, sample, top_k, top_p, temperature, generator, max_new_tokens, min_new_tokens,
    repetition_penalty, bos_id, eos_id, pad_id, stop_on_pad,
) -> torch.Tensor:
    batch = image_tokens.shape[0]
    device = image_tokens.device
    seqs = torch.full((batch, 1), bos_id, dtype=torch.long, device=device)
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    rows = torch.arange(batch, device=device)  # the rows still in the decoder, in its order
    decoder = CachedDecoder(model, image_tokens)
    logits = decoder.step(seqs)
    for step in range(max_new_tokens):
        scores = _process_scores(
            logits, seqs[rows], step, eos_id=eos_id, min_new_tokens=min_new_tokens,
            repetition_penalty=repetition_penalty,
        )
        if sample:
            scores = _filter_top_k_top_p(scores / temperature, top_k, top_p)
            chosen = torch.multinomial(scores.softmax(dim=-1), 1, generator=generator).squeeze(1)
        else:
            chosen = scores.argmax(dim=-1)
        next_tokens = torch.full((batch,), pad_id, dtype=torch.long, device=device)
        next_tokens[rows] = chosen
        seqs = torch.cat([seqs, next_tokens[:, None]], dim=1)
        done = chosen == eos_id
        if stop_on_pad:
            done |= chosen == pad_id
        finished[rows[done]] = True
        if bool(finished.all()) or step == max_new_tokens - 1:
            break
        if bool(done.any()):  # drop finished rows from the caches: later steps only compute live rows
            keep = (~done).nonzero().squeeze(1)
            decoder.reorder(keep)
            rows, chosen = rows[keep], chosen[keep]
        logits = decoder.step(chosen[:, None])
    return seqs


class _Hypotheses:
    """The finished hypotheses of one image: at most `beams`, each (score / length**length_penalty, sequence)."""

    def __init__(self, beams: int, length_penalty: float) -> None:
        self.beams, self.length_penalty = beams, length_penalty
        self.finished: list[tuple[float, torch.Tensor]] = []
        self.done = False

    def add(self, score: float, length: int, seq: torch.Tensor) -> None:
        self.finished.append((score / length**self.length_penalty, seq))
        if len(self.finished) > self.beams:
            self.finished.remove(min(self.finished, key=lambda h: h[0]))

    def update_done(self, best_live_score: float, length: int) -> None:
        """Done once it has `beams` hypotheses and its best live beam cannot beat the worst of them."""
        if len(self.finished) >= self.beams:
            self.done = best_live_score / length**self.length_penalty <= min(h[0] for h in self.finished)

    def best(self) -> torch.Tensor:
        return max(self.finished, key=lambda h: h[0])[1]


def _choose_beams(hyps: _Hypotheses, b: int, beams: int, length: int, seqs, candidates, stop_ids, chosen) -> None:
    """Image b's beams for the next step from its best `candidates` (score, beam, token), in order: a stop token
    among the top `beams` finishes a hypothesis, the others fill `chosen` = (next_scores, next_tokens,
    next_rows) until `beams` continue."""
    next_scores, next_tokens, next_rows = chosen
    kept = 0
    for rank, (score, beam, token) in enumerate(candidates):
        row = b * beams + beam
        if token in stop_ids:
            if rank < beams:  # a stop token only counts while it is among the top num_beams
                hyps.add(score, length, torch.cat([seqs[row], seqs.new_tensor([token])]))
            continue
        next_scores[b, kept], next_tokens[b, kept], next_rows[b, kept] = score, token, row
        kept += 1
        if kept == beams:
            break
    hyps.update_done(float(next_scores[b, 0]), length)


def _beam_search(
    model, image_tokens, *, num_beams, length_penalty, max_new_tokens, min_new_tokens, repetition_penalty,
    bos_id, eos_id, pad_id, stop_on_pad,
) -> torch.Tensor:
    batch, beams = image_tokens.shape[0], num_beams
    device = image_tokens.device
    stop_ids = {eos_id, pad_id} if stop_on_pad else {eos_id}

    # Step 0 is the same for every beam of an image: run it once per image, then copy the caches to the beams.
    decoder = CachedDecoder(model, image_tokens)
    logits = decoder.step(torch.full((batch, 1), bos_id, dtype=torch.long, device=device))
    expand = torch.arange(batch, device=device).repeat_interleave(beams)
    decoder.reorder(expand)
    logits = logits.index_select(0, expand)
    seqs = torch.full((batch * beams, 1), bos_id, dtype=torch.long, device=device)
    # Only beam 0 is live at first, so the first step does not pick the same token num_beams times.
    beam_scores = torch.full((batch, beams), -1e9, device=device)
    beam_scores[:, 0] = 0.0
    hypotheses = [_Hypotheses(beams, length_penalty) for _ in range(batch)]

    for step in range(max_new_tokens):
        length = step + 1  # new tokens in a candidate, its last one included
        logprobs = F.log_softmax(logits, dim=-1)
        logprobs = _process_scores(
            logprobs, seqs, step, eos_id=eos_id, min_new_tokens=min_new_tokens,
            repetition_penalty=repetition_penalty,
        )
        vocab = logprobs.shape[-1]
        candidates = (beam_scores.view(-1, 1) + logprobs).view(batch, beams * vocab)
        # Enough candidates that num_beams of them continue even if every beam's best ones are stop tokens.
        top_scores, top_ids = candidates.topk(min((len(stop_ids) + 1) * beams, beams * vocab), dim=1)
        top_beams, top_tokens = (top_ids // vocab).tolist(), (top_ids % vocab).tolist()
        top_scores_list = top_scores.tolist()

        next_scores = torch.full((batch, beams), -1e9, device=device)
        next_tokens = torch.full((batch, beams), pad_id, dtype=torch.long, device=device)
        next_rows = torch.arange(batch * beams, device=device).view(batch, beams).clone()
        for b in range(batch):
            if not hypotheses[b].done:
                _choose_beams(hypotheses[b], b, beams, length, seqs,
                              zip(top_scores_list[b], top_beams[b], top_tokens[b]), stop_ids,
                              (next_scores, next_tokens, next_rows))
        if step == max_new_tokens - 1:
            # Out of room: the live beams of unfinished images compete with their finished hypotheses.
            final = torch.cat([seqs.index_select(0, next_rows.view(-1)), next_tokens.view(-1, 1)], dim=1)
            for b in range(batch):
                if not hypotheses[b].done:
                    for k in range(beams):
                        hypotheses[b].add(float(next_scores[b, k]), length, final[b * beams + k])
            break
        if all(h.done for h in hypotheses):
            break
        index = next_rows.view(-1)
        seqs = torch.cat([seqs.index_select(0, index), next_tokens.view(-1, 1)], dim=1)
        beam_scores = next_scores
        decoder.reorder(index, cross=False)  # beams stay with their image, whose cross keys/values they share
        logits = decoder.step(next_tokens.view(-1, 1))

    return _pad_rows([hyps.best() for hyps in hypotheses], pad_id)
