"""Peak FLOP/s lookup by device name, and the rank-0 logger's jsonl / TensorBoard / console output."""

import io
import json
import os

import pytest

from megacoca.metrics.logger import TRAIN_KEYS, MetricsLogger
from megacoca.metrics.peak import peak_flops


@pytest.mark.parametrize("name, precision, expected", [
    ("NVIDIA A100-SXM4-80GB", "bf16", 312e12),
    ("NVIDIA A100-PCIE-40GB", "fp32", 19.5e12),
    ("NVIDIA H100 80GB HBM3", "bf16", 989.4e12),
    ("NVIDIA H100 PCIe", "bf16", 756.5e12),
    ("NVIDIA H200", "bf16", 989.4e12),
    ("NVIDIA L40S", "bf16", 362.1e12),
    ("NVIDIA GeForce GTX 1080", "bf16", None),
    (None, "bf16", None),
    ("NVIDIA H100 80GB HBM3", "fp8", None),
])
def test_peak_table(name, precision, expected):
    assert peak_flops(name, precision) == expected


def test_logger_writes_jsonl_tensorboard_and_progress(tmp_path):
    stream = io.StringIO()
    logger = MetricsLogger(str(tmp_path), total_steps=10, stream=stream)
    base = {"loss": 3.0, "loss_contrastive": 1.0, "loss_caption": 1.0, "logit_scale": 14.3, "lr": 1e-3,
            "grad_norm": 2.0, "samples_per_s": 100.0, "tflops_per_device": 1.5, "mfu": None, "skipped_samples": 2}
    logger.log_train({"step": 1, **base})
    logger.log_train({"step": 2, **base, "mfu": 0.41, "grad_norm": float("nan")})
    logger.log_eval(2, {"zeroshot_top1": 0.5})
    logger.close()
    records = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert list(records[0])[: len(TRAIN_KEYS)] == list(TRAIN_KEYS)
    assert records[0]["mfu"] is None and records[1]["mfu"] == 0.41
    assert records[1]["grad_norm"] is None  # nan is not valid JSON
    assert records[2] == {"step": 2, "eval/zeroshot_top1": 0.5}
    lines = stream.getvalue().splitlines()
    assert lines[0].startswith("step  1/10 | loss 3.0000 (con 1.0000 cap 1.0000)")
    assert "samples/s" in lines[0] and "ETA" in lines[0] and "skipped 2" in lines[0] and "MFU" not in lines[0]
    assert "MFU 41.0%" in lines[1]
    assert any(name.startswith("events.out.tfevents") for name in os.listdir(tmp_path / "tensorboard"))


def test_disabled_logger_does_nothing(tmp_path):
    logger = MetricsLogger(str(tmp_path / "other"), enabled=False)
    logger.log_train({"step": 1})
    logger.info("x")
    logger.close()
    assert not (tmp_path / "other").exists()


def test_mixture_accounting_reaches_jsonl_tensorboard_and_the_progress_line(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from megacoca.metrics.records import source_record

    stream = io.StringIO()
    logger = MetricsLogger(str(tmp_path), total_steps=10, stream=stream)
    fields = source_record({"captions": {"samples": 300, "epochs": 2, "skipped": 1},
                            "labels": {"samples": 100, "epochs": 0, "skipped": 0}})
    logger.log_train({"step": 1, "loss": 3.0, "samples_per_s": 100.0, **fields})
    logger.close()
    record = json.loads(open(tmp_path / "metrics.jsonl").readline())
    assert record["data/captions/samples"] == 300 and record["data/labels/epochs"] == 0
    assert "| captions 75% e2, labels 25% e0 |" in stream.getvalue()
    events = EventAccumulator(str(tmp_path / "tensorboard")).Reload()
    assert {"data/captions/samples", "data/labels/skipped"} <= set(events.Tags()["scalars"])
