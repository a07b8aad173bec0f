"""The trainer's eval runs sharded: at TP=2 (2 ranks), TP=2 x DP=2 (4 ranks), PP=2 (2 ranks) and PP=2 x TP=2
(4 ranks) under ZeRO-3 fp32, every rank's metrics (zero-shot, retrieval, cached greedy captions and their
scores) equal those of the unsharded model with the same weights evaluated in one process, and no rank ever held
more than its own shards."""

import numpy as np
import pytest
import torch
from dist_harness import run_ranks
from memory_data import SHARD_ALL, TINY, MemoryLoader

from megacoca.config.recipes import build_config
from megacoca.config.sources import ValSourceConfig
from megacoca.data import shapes
from megacoca.data.source_text import LabelText
from megacoca.eval.labelled import direct, zeroshot_labelled
from megacoca.eval.runner import evaluate, load_eval_set, make_train_eval_fn
from megacoca.models.coca import CoCa
from megacoca.parallel.dims import ParallelDims
from megacoca.parallel.zero import partition_stats
from megacoca.trainer import Trainer

EVAL = dict(max_samples=24, caption_samples=12, batch_size=8, max_new_tokens=6)


class WordTokenizer:
    """Whitespace tokenizer over the synth-shapes words: pad 0, bos 1, eos 2 (picklable: module level)."""

    pad_id, bos_id, eos_id = 0, 1, 2

    def __init__(self, context_length=12):
        self.context_length = context_length
        words = "a an of photo there is image picture showing on noisy background one drawing small large".split()
        words += list(shapes.COLORS) + list(shapes.SHAPES) + "left right above below with".split()
        self.words = ["<pad>", "<s>", "</s>"] + words
        self.ids = {w: i for i, w in enumerate(self.words)}
        self.vocab_size = len(self.words)

    def encode(self, texts):
        out = torch.zeros(len(texts), self.context_length, dtype=torch.long)
        for row, text in enumerate(texts):
            ids = [1] + [self.ids[w] for w in text.split() if w in self.ids][: self.context_length - 2] + [2]
            out[row, : len(ids)] = torch.tensor(ids)
        return out

    def decode(self, ids):
        words = []
        for i in ids.tolist():
            if i == 2:
                break
            if i > 2:
                words.append(self.words[i])
        return " ".join(words)


CFG = TINY.replace(vocab_size=len(WordTokenizer().words) + 3, tie_word_embeddings=True)  # odd: padded at tp=2


@pytest.fixture(scope="module")
def val_shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("shapes")
    shapes.write_split(str(out), "val", 24, image_size=32, shard_size=12)
    return str(out / "val")


def _sharded_eval(rank, world_size, run_dir, val_shards, tp=2, pp=1, val_sources=(), chunk_size=1024):
    dp = world_size // (tp * pp)
    job = build_config(overrides=[
        "parallel.deepspeed_config=zero3_fp32", f"parallel.tp={tp}", f"parallel.pp={pp}", "schedule.steps=1",
        "schedule.global_batch_size=8", f"schedule.micro_batch_size={8 // (2 * dp) if pp > 1 else 8 // dp}",
        f"logging.run_dir={run_dir}", f"data.val_shards={val_shards}", "logging.tensorboard=false",
        "checkpoint.save_final=false", SHARD_ALL])
    job.model.overrides = CFG.to_dict()
    job.eval.val_sources = list(val_sources)
    dims = ParallelDims.from_config(job.parallel, world_size).build()
    eval_fn = make_train_eval_fn(job, CFG, dims, WordTokenizer(), **EVAL, chunk_size=chunk_size)
    trainer = Trainer(job, MemoryLoader(2, dims.dp_rank, dims.dp_size, CFG), dims=dims, eval_fn=eval_fn)
    stats = partition_stats(trainer.engine.module)
    metrics = trainer.evaluate()
    trainer.close()
    return {"metrics": metrics, "local": stats.local_elements, "whole": stats.elements}


@pytest.mark.parametrize("world, tp, pp", [(2, 2, 1), (4, 2, 1), (2, 1, 2), (4, 2, 2)],
                         ids=["tp2", "tp2xdp2", "pp2", "pp2xtp2"])
def test_sharded_eval_equals_the_unsharded_model(tmp_path, val_shards, world, tp, pp):
    results = run_ranks(_sharded_eval, world, tmp_path, str(tmp_path / "run"), val_shards, tp, pp)
    torch.manual_seed(0)  # the trainer's seed: the same initial weights
    model = CoCa(CFG)
    whole = sum(p.numel() for p in model.parameters())
    expected = evaluate(model, WordTokenizer(), load_eval_set(val_shards, 32, 24), **{
        k: v for k, v in EVAL.items() if k != "max_samples"}, num_examples=1)
    for result in results:
        metrics = result["metrics"]
        # its tensor-parallel half (plus the replicated tensors, 22% of this tiny model), partitioned over dp;
        # under a pipeline only its stage's share of that
        dp = world // (tp * pp)
        assert result["local"] < (0.65 if tp == 2 else 1.0) * whole / dp
        if pp > 1:
            assert result["local"] < 0.9 * whole / dp / (tp / 2 if tp > 1 else 1)
        for key in ("zeroshot_top1", "i2t_r1", "i2t_r5", "t2i_r1", "t2i_r5", "caption_match"):
            assert np.isclose(metrics[key], expected[key], rtol=0, atol=1e-9), (key, metrics[key], expected[key])
        assert metrics["sample_caption"] == expected["samples"][0]["generated"]


@pytest.fixture(scope="module")
def label_set(tmp_path_factory):
    out = tmp_path_factory.mktemp("labels")
    shapes.synth_shapes(str(out), 0, 48, image_size=32, shard_size=16, workers=1, labels_only=True)
    return out


@pytest.mark.parametrize("world, tp, pp", [(2, 1, 2), (2, 2, 1)], ids=["pp2", "tp2"])
def test_sharded_eval_of_named_sets_equals_the_unsharded_model(tmp_path, val_shards, label_set, world, tp, pp):
    """eval.val_sources through the pipeline (a labelled set's class embeddings on the last stage, its images 20 at a
    time through every stage) and tensor-parallel: each set's metrics, keyed `<name>/`, are the unsharded model's."""
    sources = [ValSourceConfig(name="labels", shards=str(label_set / "val"), text="labels",
                               class_names=str(label_set / "classnames.txt"),
                               templates=str(label_set / "templates.txt")),
               ValSourceConfig(name="captions", shards=val_shards, max_samples=24)]
    results = run_ranks(_sharded_eval, world, tmp_path, str(tmp_path / "run"), val_shards, tp, pp, sources, 20)
    torch.manual_seed(0)
    model = CoCa(CFG)
    options = {k: v for k, v in EVAL.items() if k != "max_samples"}
    captions = evaluate(model, WordTokenizer(), load_eval_set(val_shards, 32, 24), **options, num_examples=1)
    labels = zeroshot_labelled(direct(model), WordTokenizer(), str(label_set / "val"),
                               LabelText(shapes.CLASS_NAMES, list(shapes.LABEL_TEMPLATES)), 32, batch_size=8)
    for result in results:
        metrics = result["metrics"]
        assert {key for key in metrics if key.startswith("labels/")} == {"labels/zeroshot_top1", "labels/zeroshot_top5"}
        for key in ("zeroshot_top1", "zeroshot_top5"):
            assert np.isclose(metrics[f"labels/{key}"], labels[key], rtol=0, atol=1e-9), (key, metrics, labels)
        for key in ("zeroshot_top1", "i2t_r1", "t2i_r1", "caption_match"):
            assert np.isclose(metrics[f"captions/{key}"], captions[key], rtol=0, atol=1e-9), key
        assert metrics["captions/sample_caption"] == captions["samples"][0]["generated"]
