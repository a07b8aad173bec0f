"""Evaluate a CoCa model on a set of shards: zero-shot classification, retrieval and captioning.

`load_model_for_eval(path)` is `megacoca.load` in fp32: a model directory or a DeepSpeed checkpoint of a megacoca
run, of any layout (megacoca.checkpoint.loader, the one loader eval and convert share). `load_eval_set` reads
shards in order, `evaluate` returns the metrics dict that `megacoca eval` writes as JSON. A labelled (ImageNet-style)
set is classified zero-shot by megacoca.eval.labelled. `make_train_eval_fn` is the trainer's periodic eval: on
`data.val_shards`, or on each named set of `eval.val_sources` (caption or label), its metrics keyed `<name>/...`.
"""

from __future__ import annotations

import functools
import json
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from megacoca.checkpoint.loader import load
from megacoca.data.shapes import CLASSES, ZERO_SHOT_TEMPLATES, class_index
from megacoca.data.shard_reader import decode_caption, image_bytes, iter_samples
from megacoca.data.source_text import text_rule
from megacoca.data.transforms import ImageTransform, load_image
from megacoca.eval.captioning import (
    caption_match_rate,
    generate_captions,
    shapes_caption_color_matches,
    shapes_caption_matches,
    shapes_caption_shape_matches,
)
from megacoca.eval.labelled import LABEL_TRAIN_EVAL_KEYS, direct, label_problem, zeroshot_labelled
from megacoca.eval.retrieval import retrieval_metrics
from megacoca.eval.zeroshot import (
    attribute_accuracy,
    caption_likelihood_logits,
    class_embeddings,
    topk_accuracy,
    zeroshot_logits,
)
from megacoca.parallel.pipeline.evaluation import pipelined_evaluate


# ------------------------------------------------------------------------------------------ model loading
def load_model_for_eval(path: str, *, model_config=None, device: str | torch.device = "cpu"):
    """An eval-mode fp32 model from anything `megacoca.load` opens (megacoca.checkpoint.loader: a model
    directory, an open_clip directory, a DeepSpeed checkpoint of any layout). `model_config`: for a DeepSpeed
    checkpoint that records no job config."""
    return load(path, model_config=model_config, device=device, dtype=torch.float32)


# --------------------------------------------------------------------------------------------- eval data
@dataclass
class EvalSet:
    images: torch.Tensor  # (N, 3, H, W) float, normalised
    captions: list[str]
    attributes: list[Any] = field(default_factory=list)  # per sample: the json dict, or None
    keys: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.captions)


def load_eval_set(shards, image_size: int, max_samples: int | None = None, caption_rule=None) -> EvalSet:
    """Read shards in order (no shuffle), center-crop transform; undecodable samples are skipped. `caption_rule`:
    a megacoca.data.source_text.CaptionText (a caption source's `caption_field`); None: the `.txt`."""
    transform = ImageTransform(image_size, train=False)
    images, captions, attributes, keys = [], [], [], []
    for raw in iter_samples(shards):
        if max_samples is not None and len(captions) >= max_samples:
            break
        caption, _ = decode_caption(raw) if caption_rule is None else caption_rule.text(raw)
        data = image_bytes(raw)
        if caption is None or data is None:
            continue
        try:
            image = transform(load_image(data, draft_size=image_size))
        except Exception:  # corrupt image: skip, like the training loader
            continue
        meta = None
        if "json" in raw:
            try:
                meta = json.loads(bytes(raw["json"]).decode("utf-8"))
            except (ValueError, UnicodeDecodeError):
                meta = None
        images.append(image)
        captions.append(caption)
        attributes.append(meta)
        keys.append(str(raw.get("__key__", len(keys))))
    if not captions:
        raise ValueError(f"no readable samples in {shards!r}")
    return EvalSet(torch.stack(images), captions, attributes, keys)


def shapes_label(meta: Any) -> int | None:
    """The synth-shapes class of a single-object sample, else None."""
    if not isinstance(meta, dict):
        return None
    if isinstance(meta.get("class"), int):
        return meta["class"]
    objects = meta.get("objects")
    if isinstance(objects, list) and len(objects) == 1 and {"color", "shape"} <= set(objects[0]):
        try:
            return class_index(objects[0]["color"], objects[0]["shape"])
        except ValueError:
            return None
    return None


def _is_shapes(eval_set: EvalSet) -> bool:
    return bool(eval_set.attributes) and all(
        isinstance(m, dict) and isinstance(m.get("objects"), list) for m in eval_set.attributes
    )


# -------------------------------------------------------------------------------------------------- eval
@torch.no_grad()
def encode_all(model, eval_set: EvalSet, tokenizer, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    device = next(model.parameters()).device
    image_features, text_features = [], []
    for start in range(0, len(eval_set), batch_size):
        images = eval_set.images[start:start + batch_size].to(device)
        text = tokenizer.encode(eval_set.captions[start:start + batch_size]).to(device)
        image_features.append(model.encode_image(images, normalize=True).float().cpu())
        text_features.append(model.encode_text(text, normalize=True).float().cpu())
    return torch.cat(image_features), torch.cat(text_features)


@torch.no_grad()
def evaluate(model, tokenizer, eval_set: EvalSet, *, batch_size: int = 256, max_new_tokens: int = 20,
             caption_samples: int | None = None, num_examples: int = 12, ks: Sequence[int] = (1, 5, 10),
             generative_zeroshot: bool = False) -> dict:
    """All metrics on `eval_set`. Zero-shot and caption_match need synth-shapes attributes (else null).

    On synth-shapes each attribute is also scored alone: zeroshot_color_acc / zeroshot_shape_acc (the
    predicted class has the true color / shape; chance 1/6 and 1/4 on the balanced val split) and
    caption_color_acc / caption_shape_acc (the caption names the right color / shape and no other).
    A model that only sees color scores ~1 on color, ~0.25 on shape and ~0.25 zero-shot top-1.

    caption_samples: caption only the first N samples (None: all).
    generative_zeroshot: also classify by caption likelihood (`caption_likelihood_logits`: every class prompt
    scored by the multimodal decoder) -> zeroshot_generative_top1 / _color_acc / _shape_acc.
    """
    was_training = model.training
    model.eval()
    timings = {}
    began = time.perf_counter()
    image_features, text_features = encode_all(model, eval_set, tokenizer, batch_size)
    results: dict[str, Any] = {"num_samples": len(eval_set)}
    results.update(retrieval_metrics(image_features, text_features, eval_set.captions, ks))
    timings["encode_and_retrieval_s"] = time.perf_counter() - began

    results["zeroshot_top1"] = results["zeroshot_top5"] = None
    results["zeroshot_color_acc"] = results["zeroshot_shape_acc"] = None
    results["num_zeroshot"] = 0
    if _is_shapes(eval_set):
        began = time.perf_counter()
        results.update(_shapes_zeroshot(model, tokenizer, eval_set, image_features, text_features, ks=ks,
                                        batch_size=batch_size, generative=generative_zeroshot))
        timings["zeroshot_s"] = time.perf_counter() - began

    began = time.perf_counter()
    results.update(_caption_metrics(model, tokenizer, eval_set, batch_size=batch_size, max_new_tokens=max_new_tokens,
                                    caption_samples=caption_samples, num_examples=num_examples))
    timings["captioning_s"] = time.perf_counter() - began
    results["timings"] = {k: round(v, 3) for k, v in timings.items()}
    model.train(was_training)
    return results


def _shapes_zeroshot(model, tokenizer, eval_set: EvalSet, image_features, text_features, *, ks, batch_size: int,
                     generative: bool) -> dict:
    """Synth-shapes' class-level retrieval and zero-shot classification (by embedding, and by caption likelihood
    with `generative`), each attribute also scored alone."""
    results: dict[str, Any] = {}
    labels = [shapes_label(m) for m in eval_set.attributes]
    if all(label is not None for label in labels):
        # Class-level retrieval: any caption naming the same (color, shape) is a positive. The exact-pair
        # numbers above also ask for the caption's random template and size word, which no image shows.
        results.update(retrieval_metrics(image_features, text_features, ks=ks, groups=labels, prefix="class_"))
    keep = torch.tensor([label is not None for label in labels])
    if not bool(keep.any()):
        return results
    classes = [{"color": c, "shape": s} for c, s in CLASSES]
    class_features = class_embeddings(model, tokenizer, classes, ZERO_SHOT_TEMPLATES, batch_size)
    logits = zeroshot_logits(image_features[keep], class_features)
    target = torch.tensor([label for label in labels if label is not None])
    accuracy = topk_accuracy(logits, target, (1, 5))
    results["zeroshot_top1"], results["zeroshot_top5"] = accuracy[1], accuracy[5]
    for attribute, index in (("color", 0), ("shape", 1)):
        results[f"zeroshot_{attribute}_acc"] = attribute_accuracy(logits, target, [cls[index] for cls in CLASSES])
    results["num_zeroshot"] = int(keep.sum())
    if generative:
        logits = caption_likelihood_logits(model, tokenizer, eval_set.images[keep], classes, ZERO_SHOT_TEMPLATES)
        results["zeroshot_generative_top1"] = topk_accuracy(logits, target, (1,))[1]
        for attribute, index in (("color", 0), ("shape", 1)):
            results[f"zeroshot_generative_{attribute}_acc"] = attribute_accuracy(
                logits, target, [cls[index] for cls in CLASSES])
    return results


def _caption_metrics(model, tokenizer, eval_set: EvalSet, *, batch_size: int, max_new_tokens: int,
                     caption_samples: int | None, num_examples: int) -> dict:
    """Greedy captions of the first `caption_samples` samples, and on synth-shapes whether they name the right
    object (and its colour, its shape); the first `num_examples` as examples."""
    device = next(model.parameters()).device
    count = len(eval_set) if caption_samples is None else min(caption_samples, len(eval_set))
    captions: list[str] = []
    for start in range(0, count, batch_size):
        images = eval_set.images[start:min(start + batch_size, count)].to(device)
        captions += generate_captions(model, images, tokenizer, max_new_tokens=max_new_tokens)
    results: dict[str, Any] = {"num_captioned": count}
    hits: list[bool | None] = [None] * count
    results["caption_match"] = results["caption_color_acc"] = results["caption_shape_acc"] = None
    if _is_shapes(eval_set) and count:
        attributes = eval_set.attributes[:count]
        results["caption_match"], hits = caption_match_rate(captions, attributes, shapes_caption_matches)
        results["caption_color_acc"], _ = caption_match_rate(captions, attributes, shapes_caption_color_matches)
        results["caption_shape_acc"], _ = caption_match_rate(captions, attributes, shapes_caption_shape_matches)
    results["samples"] = [
        {"key": eval_set.keys[i], "reference": eval_set.captions[i], "generated": captions[i], "match": hits[i]}
        for i in range(min(num_examples, count))
    ]
    return results


def headline(results: dict) -> str:
    """A short fixed-width table of the main metrics."""
    rows = [("zeroshot_top1", "zero-shot top-1"), ("zeroshot_color_acc", "  color right"),
            ("zeroshot_shape_acc", "  shape right"), ("zeroshot_generative_top1", "generative zero-shot"),
            ("zeroshot_generative_shape_acc", "  shape right"), ("i2t_r1", "image->text R@1"),
            ("i2t_r5", "image->text R@5"),
            ("t2i_r1", "text->image R@1"), ("t2i_r5", "text->image R@5"),
            ("class_i2t_r1", "  same class R@1"), ("class_t2i_r1", "  same class t2i R@1"),
            ("caption_match", "caption match"), ("caption_color_acc", "  color right"),
            ("caption_shape_acc", "  shape right")]
    lines = [f"{'metric':<20}{'value':>8}", "-" * 28]
    for key, label in rows:
        if key.startswith(("class_", "zeroshot_generative")) and key not in results:
            continue
        value = results.get(key)
        lines.append(f"{label:<20}{'n/a' if value is None else format(value, '.3f'):>8}")
    lines.append(f"{'samples':<20}{results.get('num_samples', 0):>8}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------- the trainer's hook
TRAIN_EVAL_KEYS = ("zeroshot_top1", "zeroshot_color_acc", "zeroshot_shape_acc", "i2t_r1", "i2t_r5", "t2i_r1",
                   "t2i_r5", "caption_match", "caption_color_acc", "caption_shape_acc")


def make_train_eval_fn(job, model_cfg, dims, tokenizer, *, max_samples: int = 480, caption_samples: int = 240,
                       batch_size: int = 240, max_new_tokens: int = 20, chunk_size: int = 1024):
    """The trainer's periodic eval: `eval_fn(engine, step) -> dict` on the first `max_samples` val samples, or with
    `eval.val_sources` on each named set in turn, its metrics keyed `<name>/<metric>` (`val_sources_eval_fn`).

    Runs sharded, on the training model itself: every rank evaluates the same samples in lockstep through the
    engine's module, so ZeRO-3 gathers each layer's parameters only while that layer runs and tensor-parallel
    layers run on their shards (no rank ever holds a full copy of the model). The control flow (generation
    stopping early, finished rows leaving the batch) depends only on the outputs, which are identical on
    every rank (the same samples, the same parameters, all-reduced tensor-parallel outputs), so every rank
    issues the same collectives. Data-parallel ranks duplicate the work rather than split it: the eval costs
    one rank's time. Every rank returns the metrics; the trainer logs rank 0's. Under pipeline parallelism the
    last stage evaluates while the stages before it run their share of the image tower on request
    (megacoca.parallel.pipeline.evaluation).
    """
    if job.eval.val_sources:
        return val_sources_eval_fn(job, model_cfg, dims, tokenizer, caption_samples=caption_samples,
                                   batch_size=batch_size, max_new_tokens=max_new_tokens, chunk_size=chunk_size)
    eval_set = load_eval_set(job.data.val_shards, model_cfg.image_size, max_samples)
    metrics_of = _train_metrics(tokenizer, eval_set, caption_samples=caption_samples, batch_size=batch_size,
                                max_new_tokens=max_new_tokens)

    def eval_fn(engine, step: int) -> dict:
        return engine_run(engine, dims)(metrics_of, eval_set.images)

    return eval_fn


def engine_run(engine, dims):
    """`run(fn, images) -> fn(model)` on the training model (megacoca.eval.labelled): the engine's module, or
    under pipeline parallelism the last stage's stand-in while the others serve rows of `images`."""
    if dims.pp_size > 1:
        return lambda fn, images: pipelined_evaluate(engine, dims, fn, images)
    return direct(getattr(engine, "module", engine))


def _train_metrics(tokenizer, eval_set: EvalSet, *, caption_samples: int, batch_size: int, max_new_tokens: int):
    """`metrics_of(model)`: TRAIN_EVAL_KEYS of `evaluate` on a caption set, and the first sample's caption."""

    def metrics_of(model) -> dict:
        results = evaluate(model, tokenizer, eval_set, batch_size=batch_size, max_new_tokens=max_new_tokens,
                           caption_samples=caption_samples, num_examples=1)
        out = {key: results[key] for key in TRAIN_EVAL_KEYS if results.get(key) is not None}
        if results["samples"]:
            out["sample_caption"] = results["samples"][0]["generated"]
        return out

    return metrics_of


def val_sources_eval_fn(job, model_cfg, dims, tokenizer, *, caption_samples: int = 240, batch_size: int = 240,
                        max_new_tokens: int = 20, chunk_size: int = 1024):
    """`eval_fn(engine, step)` over `job.eval.val_sources`, each set in turn, its metrics keyed `<name>/<metric>`:
    a caption set (held in memory, read here) gives TRAIN_EVAL_KEYS of `evaluate` and `sample_caption`; a label
    set (read again at each eval, `chunk_size` images at a time: megacoca.eval.labelled) gives
    LABEL_TRAIN_EVAL_KEYS. Each set is its first `max_samples` samples (0: all). The class-name and template files
    are read, and a label set's first samples checked for a valid label, here: a bad source is an error before
    training starts, not at its first eval."""
    evaluators = []
    for source in job.eval.val_sources:
        rule = text_rule(source, job.seed)  # ConfigError naming the source
        if source.text == "labels":
            problem = label_problem(source.shards, rule)
            if problem:
                raise ValueError(f"eval.val_sources {source.name!r}: {problem}")
            evaluators.append((source.name, functools.partial(
                _labelled_train_metrics, tokenizer=tokenizer, shards=source.shards, rule=rule,
                image_size=model_cfg.image_size, batch_size=batch_size, max_samples=source.max_samples,
                chunk_size=chunk_size)))
        else:
            eval_set = load_eval_set(source.shards, model_cfg.image_size, source.max_samples or None, rule)
            metrics_of = _train_metrics(tokenizer, eval_set, caption_samples=caption_samples, batch_size=batch_size,
                                        max_new_tokens=max_new_tokens)
            evaluators.append((source.name, functools.partial(_run_on_set, metrics_of, eval_set.images)))

    def eval_fn(engine, step: int) -> dict:
        run = engine_run(engine, dims)
        return {f"{name}/{key}": value for name, metrics_of in evaluators for key, value in metrics_of(run).items()}

    return eval_fn


def _run_on_set(metrics_of, images: torch.Tensor, run) -> dict:
    return run(metrics_of, images)


def _labelled_train_metrics(run, **options) -> dict:
    results = zeroshot_labelled(run, **options)
    return {key: results[key] for key in LABEL_TRAIN_EVAL_KEYS if results.get(key) is not None}
