"""Zero-shot classification of a labelled set: ImageNet-style shards whose samples hold a class label (their `.cls`
file or a `.json` field), the class names and prompt templates from files (megacoca.data.source_text; open_clip's
ImageNet names and templates written one per line: examples/zeroshot/).

`zeroshot_labelled(run, tokenizer, shards, rule, image_size)` is open_clip's zero-shot classifier: each class is
the mean of its prompts' normalised text embeddings over every template, renormalised, and each image is scored
against all of them (cosine). The set is read in order, `chunk_size` images at a time, so a 50,000-image
validation set is never held in memory. Its metrics:
- `zeroshot_top1`, `zeroshot_top5`: the fraction of scored samples whose label is the highest class / among the
  5 highest (ties count against the label). `zeroshot_top5` is null for a set of 5 classes or fewer, where every
  label is among the top 5 and the number says nothing;
- `num_samples` (scored), `num_skipped` and `skipped` (by reason: `missing_label`, `bad_label` (an id out of
  range, an unknown class name), `missing_image`, `corrupt_image`), `num_classes`, `num_templates`.

`run(fn, images)` runs `fn(model)` on the model being evaluated and returns its result: `fn(model)` itself, or
under pipeline parallelism megacoca.parallel.pipeline.evaluation.pipelined_evaluate (whose stages before the last
serve the image tower for rows of `images`), every rank in lockstep (megacoca.eval.runner.make_train_eval_fn).
"""

from __future__ import annotations

import functools
import time
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import torch

from megacoca.data.shard_reader import image_bytes, iter_samples
from megacoca.data.shard_urls import expand_shards, is_remote
from megacoca.data.source_text import LabelText
from megacoca.data.transforms import ImageTransform, load_image
from megacoca.eval.zeroshot import named_class_prompts, prompt_embeddings, topk_hits, zeroshot_logits

Run = Callable[[Callable[[Any], Any], torch.Tensor], Any]  # run(fn, images) -> fn(model) (module doc)
TOP5_MIN_CLASSES = 6  # zeroshot_top5 only for more than 5 classes (module doc)
LABEL_PROBE = 64  # samples read by `label_problem`
LABEL_TRAIN_EVAL_KEYS = ("zeroshot_top1", "zeroshot_top5")  # what the trainer logs of a labelled set


def direct(model) -> Run:
    """`run` on a model in this process (no pipeline)."""
    return lambda fn, images: fn(model)


def in_eval_mode(fn: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """`fn(model)` with the model in eval mode, its mode restored after."""

    @functools.wraps(fn)
    def wrapped(model):
        was_training = model.training
        model.eval()
        try:
            return fn(model)
        finally:
            model.train(was_training)

    return wrapped


def labelled_chunks(shards, image_size: int, rule: LabelText, skipped: Counter, *, max_samples: int = 0,
                    chunk_size: int = 1024) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(images (n, 3, S, S) normalised, labels (n,)) of the shards in order, `chunk_size` samples at a time (the
    last chunk shorter), center-crop transform; the first `max_samples` scored samples (0: all). A sample without a
    valid label or a readable image is skipped and counted in `skipped` by reason."""
    transform = ImageTransform(image_size, train=False)
    images, labels, taken = [], [], 0
    for raw in iter_samples(shards):
        if max_samples and taken >= max_samples:
            break
        label, reason = rule.label(raw)
        data = image_bytes(raw)
        if reason is None and data is None:
            reason = "missing_image"
        if reason is None:
            try:
                image = transform(load_image(data, draft_size=image_size))
            except Exception:  # corrupt image: skipped, as the training loader does
                reason = "corrupt_image"
        if reason is not None:
            skipped[reason] += 1
            continue
        images.append(image)
        labels.append(label)
        taken += 1
        if len(images) == chunk_size:
            yield torch.stack(images), torch.tensor(labels)
            images, labels = [], []
    if images:
        yield torch.stack(images), torch.tensor(labels)


def label_problem(shards, rule: LabelText, probe: int = LABEL_PROBE) -> str | None:
    """None when one of the first `probe` samples has a valid label, else a one-line reason (a wrong label_field,
    a class-names file that does not match the labels). Reads local shards only (None for remote ones): a check
    before any work, not a full read."""
    urls = expand_shards(shards)
    if is_remote(urls[0]):
        return None
    reasons: Counter = Counter()
    for index, raw in enumerate(iter_samples(urls)):
        if index >= probe:
            break
        _, reason = rule.label(raw)
        if reason is None:
            return None
        reasons[reason] += 1
    if not reasons:
        return f"{shards} holds no samples"
    where = "the .cls file" if rule.field == "cls" else f"the .json field {rule.field!r}"
    return (f"none of the first {sum(reasons.values())} samples has a valid label in {where} "
            f"({', '.join(f'{k} {v}' for k, v in sorted(reasons.items()))}; {len(rule.class_names)} classes: "
            "an id must be in [0, classes), a name one of the class names)")


@torch.no_grad()
def encode_images(model, images: torch.Tensor, batch_size: int) -> torch.Tensor:
    """(N, E) normalised image embeddings on the CPU, `batch_size` consecutive rows at a time."""
    device = next(model.parameters()).device
    return torch.cat([model.encode_image(images[start:start + batch_size].to(device), normalize=True).float().cpu()
                      for start in range(0, images.shape[0], batch_size)])


def zeroshot_labelled(run: Run, tokenizer, shards, rule: LabelText, image_size: int, *, batch_size: int = 256,
                      max_samples: int = 0, chunk_size: int = 1024) -> dict:
    """The metrics of the module doc; ValueError (one line) when no sample can be scored."""
    began = time.perf_counter()
    prompts = named_class_prompts(rule.class_names, rule.templates)
    no_images = torch.empty(0, 3, image_size, image_size)
    class_features = run(in_eval_mode(lambda model: prompt_embeddings(model, tokenizer, prompts, batch_size)),
                         no_images)
    classes_s = time.perf_counter() - began
    ks = (1, 5) if len(rule.class_names) >= TOP5_MIN_CLASSES else (1,)
    hits, count, skipped = Counter(), 0, Counter()
    for images, labels in labelled_chunks(shards, image_size, rule, skipped, max_samples=max_samples,
                                          chunk_size=chunk_size):
        encode = in_eval_mode(functools.partial(encode_images, images=images, batch_size=batch_size))
        logits = zeroshot_logits(run(encode, images), class_features)
        hits.update(topk_hits(logits, labels, ks))
        count += len(labels)
    if count == 0:
        reasons = ", ".join(f"{k} {v}" for k, v in sorted(skipped.items())) or "no samples"
        raise ValueError(f"no sample of {shards} has a readable image and a valid label ({reasons})")
    return {
        "zeroshot_top1": hits[1] / count,
        "zeroshot_top5": hits[5] / count if 5 in ks else None,
        "num_samples": count,
        "num_skipped": sum(skipped.values()),
        "skipped": dict(sorted(skipped.items())),
        "num_classes": len(rule.class_names),
        "num_templates": len(rule.templates),
        "timings": {"class_embeddings_s": round(classes_s, 3),
                    "images_s": round(time.perf_counter() - began - classes_s, 3)},
    }


def labelled_headline(results: dict) -> str:
    """A short fixed-width table of a labelled set's metrics."""
    top5 = results.get("zeroshot_top5")
    rows = [("zero-shot top-1", format(results["zeroshot_top1"], ".3f")),
            ("zero-shot top-5", "n/a" if top5 is None else format(top5, ".3f")),
            ("samples", str(results["num_samples"])), ("skipped", str(results["num_skipped"])),
            ("classes", str(results["num_classes"])), ("templates", str(results["num_templates"]))]
    return "\n".join([f"{'metric':<20}{'value':>8}", "-" * 28] + [f"{label:<20}{value:>8}" for label, value in rows])
