"""Every bad input is one line on stderr naming the key, argument or file and what is wrong, and exit code 2,
before any process group or model exists: a table over every subcommand (train, eval, data, tokenizer,
convert), run through `megacoca.cli.main` in-process, and a few through `python -m` in a subprocess."""

from __future__ import annotations

import io
import json
import os
import shlex
import subprocess
import sys
import tarfile

import pytest

from megacoca.cli import main

TRAIN = ("train --train-shards {shards} --set eval.every=0 --set schedule.steps=1 "
         "--set schedule.global_batch_size=8 --set schedule.micro_batch_size=4 ")
EVAL = "eval --checkpoint {emptydir} --shards {shards} --tokenizer clip-bpe "
FOLDER = "data from-folder --out {tmp}/out "
MIX = ("train --set eval.every=0 --set schedule.steps=1 --set schedule.global_batch_size=8 "
       "--set schedule.micro_batch_size=4 ")
CAPS = "{{name: caps, shards: {shards}}}"
LABELS = "{{name: labs, shards: {label_shards}, text: labels, class_names: {names}, templates: {templates}}}"

# (command line, a fragment the error line must hold: it names the key, argument or file and says what is wrong)
CASES = [
    # ---- train: the job config's values (JobConfig.validate, CoCaConfig.validate, ParallelDims)
    (TRAIN + "--set data.num_workers=-1", "data.num_workers must be >= 0"),
    (TRAIN + "--set seed=-1", "seed must be >= 0, got -1"),
    (TRAIN + "--set optim.eps=0", "optim.eps must be > 0"),
    (TRAIN + "--set optim.lr=nan", "optim.lr must be a finite number"),
    (TRAIN + "--set optim.caption_weight=-1", "optim.contrastive_weight and optim.caption_weight must be >= 0"),
    (TRAIN + "--set optim.betas=[0.9,1.5]", "optim.betas must be two numbers in [0, 1)"),
    (TRAIN + "--set optim.lrr=1", "unknown config key '--set optim.lrr'"),
    (TRAIN + "--set schedule.micro_batch_size=3",
     "schedule.global_batch_size 8 is not divisible by micro_batch_size 3"),
    (TRAIN + "--set schedule.decay=step", "--set schedule.decay: must be one of 'cosine', 'linear', 'constant'"),
    (TRAIN + "--set schedule.min_lr_ratio=2", "schedule.min_lr_ratio must be in [0, 1]"),
    (TRAIN + "--set checkpoint.keep=-1", "checkpoint.keep must be >= 0"),
    (TRAIN + "--set checkpoint.save_final=maybe", "--set checkpoint.save_final: expected bool, got 'maybe'"),
    (TRAIN + "--set logging.log_every=0", "logging.log_every must be >= 1"),
    (TRAIN + "--set model.flavor=coca_huge", "model.flavor: unknown model flavor 'coca_huge'"),
    (TRAIN + "--set model.overrides.patch_size=0", "model.overrides: CoCaConfig: patch_size must be >= 1, got 0"),
    (TRAIN + "--set model.overrides.vision_heads=0", "CoCaConfig: vision_heads must be >= 1, got 0"),
    (TRAIN + "--set model.overrides.ln_eps=-1", "CoCaConfig: ln_eps must be > 0"),
    (TRAIN + "--set model.overrides.context_length=1", "CoCaConfig: context_length must be >= 2"),
    (TRAIN + "--set model.overrides.vision_widht=64",
     "unknown CoCaConfig field in '--set model.overrides.vision_widht'"),
    (TRAIN + "--set fault.max_bad_steps=0", "fault.max_bad_steps must be >= 1, got 0"),
    (TRAIN + "--set fault.loss_spike_factor=0.5", "fault.loss_spike_factor must be 0 (off) or > 1, got 0.5"),
    (TRAIN + "--set fault.loss_spike_window=0", "fault.loss_spike_window must be >= 1"),
    (TRAIN + "--set fault.replica_check_every=-1", "fault.replica_check_every must be >= 0 (0: off), got -1"),
    (TRAIN + "--set fault.rendezvous_timeout_s=-5", "fault.rendezvous_timeout_s must be >= 0 seconds"),
    (TRAIN + "--set data.shard_retries=-1", "data.shard_retries must be >= 0, got -1"),
    (TRAIN + "--set data.shard_timeout_s=-5", "data.shard_timeout_s must be >= 0 seconds"),
    (TRAIN + "--set parallel.tp=0", "parallel: tp must be a positive integer, got 0"),
    (TRAIN + "--set parallel.text_ahead=-2", "parallel.text_ahead must be -1"),
    (TRAIN + "--set parallel.pipeline_split=[1,2]", "parallel.pipeline_split [1, 2] lists 2 stages but parallel.pp=1"),
    (TRAIN + "--set parallel.precision=fp16", "--set parallel.precision: must be one of 'auto', 'bf16', 'fp32'"),
    (TRAIN + "--set foo", "--set expects KEY=VALUE"),
    (TRAIN + "--recipe coca_nope", "unknown recipe 'coca_nope'"),
    (TRAIN + "--steps abc", "argument --steps: invalid int value: 'abc'"),
    (TRAIN + "--bogus", "unrecognized arguments: --bogus"),
    # ---- train: the files behind the config
    (TRAIN + "--set data.tokenizer={not_a_model}", "data.tokenizer: {not_a_model} is not a SentencePiece model"),
    (TRAIN + "--set data.tokenizer={tmp}/missing.model",
     "data.tokenizer: tokenizer model not found: {tmp}/missing.model"),
    (TRAIN + "--set data.tokenizer={emptydir}", "data.tokenizer: tokenizer model {emptydir} is a directory"),
    (TRAIN + "--set data.tokenizer=", "data.tokenizer is empty"),
    (TRAIN + "--train-shards {tmp}/missing", "data.train_shards: shard not found: {tmp}/missing"),
    (TRAIN + "--train-shards {not_a_tar}", "data.train_shards: {not_a_tar} is not a tar shard (not a tar archive)"),
    (TRAIN + "--train-shards {empty_tar}", "data.train_shards: {empty_tar} is not a tar shard (an empty file)"),
    (TRAIN + "--train-shards {emptydir}", "data.train_shards: no shards (*.tar) in directory: {emptydir}"),
    (TRAIN + "--set eval.every=5 --val-shards {not_a_tar}", "data.val_shards: {not_a_tar} is not a tar shard"),
    (TRAIN + "--config {tmp}/missing.yaml", "config file not found: {tmp}/missing.yaml"),
    (TRAIN + "--config {bad_yaml}", "cannot parse {bad_yaml}"),
    (TRAIN + "--config {list_yaml}", "{list_yaml}: expected a mapping at the top level, got list"),
    (TRAIN + "--config {typo_yaml}", "unknown config key '{typo_yaml}: optim.lrr'"),
    (TRAIN + "--resume {tmp}/missing", "checkpoint.resume: no checkpoint directory {tmp}/missing"),
    (TRAIN + "--set checkpoint.dir={a_file}",
     "checkpoint.dir: checkpoint directory {a_file} is a file, not a directory"),
    (TRAIN + "--run-dir {a_file}/run", "logging.run_dir: cannot create run directory {a_file}/run: {a_file} is a file"),
    # ---- train: the DeepSpeed JSON (the keys megacoca reads, and DeepSpeed's own ZeRO section model)
    (TRAIN + "--ds-config zero7", "parallel.deepspeed_config: no such file or ds_configs name 'zero7'"),
    (TRAIN + "--ds-config {ds_not_json}", "cannot parse DeepSpeed config {ds_not_json}"),
    (TRAIN + "--ds-config {ds_list}", "DeepSpeed config {ds_list}: expected a JSON object"),
    (TRAIN + "--ds-config {ds_stage7}", "DeepSpeed config {ds_stage7}: zero_optimization.stage must be 0, 1, 2 or 3"),
    (TRAIN + "--ds-config {ds_bf16}", "DeepSpeed config {ds_bf16}: bf16 must be an object"),
    (TRAIN + "--ds-config {ds_batch}", "DeepSpeed config {ds_batch}: train_batch_size must be a number or \"auto\""),
    (TRAIN + "--ds-config {ds_offload}", "zero_optimization.offload_optimizer.device must be \"none\", \"cpu\" or"),
    (TRAIN + "--ds-config {ds_typo}", "zero_optimization.stage3_param_persistance_threshold is not a ZeRO setting "
                                      "DeepSpeed knows; did you mean stage3_param_persistence_threshold?"),
    (TRAIN + "--ds-config {ds_optimizer}", "DeepSpeed config has an 'optimizer' section"),
    (TRAIN + "--ds-config {ds_no_overflow_check}", "DeepSpeed config {ds_no_overflow_check}: bf16.check_grad_overflow "
                                                   "must be true (or left out), got False: megacoca's bad-step guard "
                                                   "relies on the skip of a bf16 step whose gradients are not finite"),
    (TRAIN + "--ds-config {ds_no_grad_norm} --set optim.grad_clip=0",
     "DeepSpeed config {ds_no_grad_norm}: zero_optimization.compute_grad_norm must be true (or left out), got False"),
    (TRAIN + "--set parallel.deepspeed_overrides.bf16.check_grad_overflow=false",
     "zero3_bf16 + parallel.deepspeed_overrides: bf16.check_grad_overflow must be true (or left out), got False"),
    (TRAIN + "--set parallel.deepspeed_overrides.zero_optimization.stage=x",
     "zero3_bf16 + parallel.deepspeed_overrides: zero_optimization.stage must be 0, 1, 2 or 3, got 'x'"),
    (TRAIN + "--set parallel.deepspeed_overrides.train_batch_size=3",
     "parallel.deepspeed_overrides.train_batch_size: megacoca derives this"),
    # ---- train: a data mixture (data.sources, eval.val_sources)
    (MIX + "--set 'data.sources=[{{name: a, shards: {shards}, weight: 0}}]'", "data.sources[0] ('a').weight must be "
     "a number > 0, got 0"),
    (MIX + "--set 'data.sources=[{{name: a, shards: {shards}, weight: abc}}]'",
     "--set data.sources[0].weight: expected float, got 'abc'"),
    (MIX + "--set 'data.sources=[{{name: a, shards: {shards}, wieght: 1}}]'", "--set data.sources[0]: unknown key "
     "'wieght'"),
    (MIX + "--set 'data.sources=[" + CAPS + "," + CAPS + "]'", "data.sources[1] ('caps'): duplicate source name"),
    (MIX + "--set 'data.sources=[{{name: l, shards: {shards}, text: labels, class_names: {names}}}]'",
     "data.sources[0] ('l'): a label source needs templates"),
    (MIX + "--set 'data.sources=[{{name: a, shards: {tmp}/missing}}]'",
     "data.sources[0] ('a'): shards: shard not found: {tmp}/missing"),
    (MIX + "--set 'data.sources=[" + CAPS + "," + LABELS + "]'", "data.sources[1] ('labs'): sample l0001 of "
     "{label_shards}/00000.tar: the label in the .cls file is out of range"),
    (MIX + "--set 'data.sources=[{{name: l, shards: {label_shards}, text: labels, class_names: {names}, "
     "templates: {names}}}]'", "data.sources[0] ('l'): source 'l': templates file {names}: 'cat' has no '{{}}'"),
    (MIX + "--set data.num_workers=3 --set 'data.sources=[" + CAPS + "]'",
     "data.sources[0] ('caps'): shards: 2 shards cannot feed 3 readers"),
    (MIX + "--set 'data.sources=[" + CAPS + "]' --set data.on_source_failure=skip",
     "--set data.on_source_failure: must be one of 'stop', 'drop'"),
    (TRAIN + "--set 'data.sources=[" + CAPS + "]'", "data.sources and data.train_shards are both set"),
    (MIX + "--set 'data.sources=[" + CAPS + "]' --set eval.every=5 --set 'eval.val_sources=[{{name: v, shards: "
     "{label_shards}, text: labels, class_names: {tmp}/missing.txt, templates: {templates}}}]'",
     "eval.val_sources[0] ('v'): source 'v': class names file not found: {tmp}/missing.txt"),
    # ---- eval
    (EVAL + "--shards {tmp}/missing", "megacoca eval: error: argument --shards: shard not found: {tmp}/missing"),
    (EVAL + "--tokenizer {not_a_model}", "argument --tokenizer: {not_a_model} is not a SentencePiece model"),
    (EVAL + "--batch-size 0", "argument --batch-size: must be >= 1, got 0"),
    (EVAL + "--max-new-tokens x", "argument --max-new-tokens: expected an integer >= 1, got 'x'"),
    (EVAL + "--caption-samples -1", "argument --caption-samples: must be >= 1, got -1"),
    (EVAL + "--out {emptydir}", "argument --out: output file {emptydir} is a directory"),
    (EVAL + "--metrics {tmp}/missing.jsonl --curves {tmp}/c.png", "argument --metrics: metrics file not found"),
    (EVAL + "--curves {tmp}/c.png", "--curves needs --metrics"),
    (EVAL + "--model-set vocab_size=8", "--model-set needs --flavor"),
    (EVAL + "--flavor coca_huge", "--flavor: unknown model flavor 'coca_huge'"),
    (EVAL + "--flavor coca_tiny --model-set vision_heads=0", "--model-set: CoCaConfig: vision_heads must be >= 1"),
    (EVAL + "--flavor coca_tiny --model-set vision_widht=64", "unknown CoCaConfig field in '--model-set vision_widht'"),
    (EVAL + "--flavor coca_tiny --model-set wide", "--model-set expects FIELD=VALUE"),
    ("eval --checkpoint {emptydir} --shards {shards}", "the following arguments are required: --tokenizer"),
    (EVAL + "--class-names {tmp}/missing.txt --templates {tmp}/missing.txt",
     "argument --class-names: class names file not found: {tmp}/missing.txt"),
    (EVAL + "--class-names {emptydir} --templates {tmp}/t.txt", "argument --class-names: class names file {emptydir} "
     "is a directory"),
    (EVAL + "--label-field cls", "--label-field needs --class-names and --templates"),
    ("eval --checkpoint {emptydir} --tokenizer clip-bpe", "nothing to evaluate: give --shards"),
    ("eval --checkpoint {emptydir} --tokenizer clip-bpe --config {tmp}/missing.yaml",
     "argument --config: config file not found: {tmp}/missing.yaml"),
    # ---- data
    ("data synth-shapes --out {tmp}/s --train-samples -1", "argument --train-samples: must be >= 0, got -1"),
    ("data synth-shapes --out {tmp}/s --image-size 8", "argument --image-size: must be >= 16, got 8"),
    ("data synth-shapes --out {tmp}/s --two-object-fraction 2", "argument --two-object-fraction: must be in [0, 1]"),
    ("data synth-shapes --out {a_file}", "argument --out: output directory {a_file} is a file, not a directory"),
    ("data synth-shapes --out {tmp}/s --train-samples 0 --val-samples 0", "are both 0: nothing to write"),
    ("data synth-shapes --out {tmp}/s --format gif", "argument --format: invalid choice: 'gif'"),
    ("data synth-shapes --out {tmp}/s --labels-only --two-object-fraction 0.5",
     "--two-object-fraction: a label-only set (--labels-only) holds single-object images only"),
    ("data stats --source a=x:{shards}", "argument --source: expected NAME=WEIGHT:SHARDS with a weight > 0"),
    ("data stats --source a=1:{tmp}/missing", "source 'a': shard not found: {tmp}/missing"),
    ("data stats --source a=1:{shards} --source a=2:{shards}", "--source: the name 'a' is given twice"),
    ("data stats --config {tmp}/missing.yaml", "argument --config: config file not found: {tmp}/missing.yaml"),
    (FOLDER + "--sidecar --images {emptydir}", "argument --images: images folder {emptydir} holds no images"),
    (FOLDER + "--sidecar --images {tmp}/missing", "argument --images: images folder not found: {tmp}/missing"),
    (FOLDER + "--images {images} --captions {captions_no_rows}", "captions file {captions_no_rows} has no rows"),
    (FOLDER + "--images {images} --captions {captions_no_caption}", "{captions_no_caption}:2: no caption column"),
    (FOLDER + "--images {images} --captions {not_a_model}", "captions file must be .csv, .tsv or .jsonl"),
    (FOLDER + "--images {images} --sidecar --shard-size 0", "argument --shard-size: must be >= 1, got 0"),
    ("data inspect --shards {not_a_tar}", "argument --shards: {not_a_tar} is not a tar shard"),
    ("data inspect --shards {shards} --show -1", "argument --show: must be >= 0, got -1"),
    ("data nope", "megacoca data: error: argument DATA_COMMAND: invalid choice: 'nope'"),
    ("data", "megacoca data: error: the following arguments are required: DATA_COMMAND"),
    # ---- tokenizer
    ("tokenizer train --shards {shards} --output {tmp}/tok --vocab-size 0", "argument --vocab-size: must be >= 5"),
    ("tokenizer train --shards {emptydir} --output {tmp}/tok --vocab-size 64", "no shards (*.tar) in directory"),
    ("tokenizer train --output {a_file}/tok --shards {shards} --vocab-size 64",
     "argument --output: directory of the output file {a_file} is a file"),
    ("tokenizer train --shards {shards} --output {tmp}/tok --vocab-size 64 --max-sentences 0",
     "argument --max-sentences: must be >= 1"),
    ("tokenizer encode --tokenizer {not_a_model} hi", "argument --tokenizer: {not_a_model} is not a SentencePiece"),
    ("tokenizer encode --tokenizer clip-bpe --context-length 1 hi", "argument --context-length: must be >= 2"),
    ("tokenizer encode --tokenizer clip-bpe", "the following arguments are required: texts"),
    # ---- convert
    ("convert from-open-clip --input {not_a_model} --model coca_ViT-B-32 --output {tmp}/m",
     "argument --input: {not_a_model} is not a state dict written by torch.save"),
    ("convert from-open-clip --model {not_a_coca_json} --input {tmp}/x.pt --output {tmp}/m",
     "argument --model: {not_a_coca_json} is not an open_clip CoCa model config (no 'embed_dim' key)"),
    ("convert to-open-clip --input {emptydir} --output {tmp}/x.pt",
     "argument --input: {emptydir} is not a megacoca model directory (no config.json)"),
    ("convert to-open-clip --input {bad_model_dir} --output {tmp}/x.pt",
     "{bad_model_dir}/config.json: not a megacoca model config"),
    ("convert to-open-clip --output {a_file} --input {bad_model_dir}",
     "argument --output: output directory {a_file} is a file, not a directory"),
    ("convert to-open-clip --output {emptydir}/x.pt --input {ckpt_no_states}",
     "{ckpt_no_states}/step00000001 is incomplete: {ckpt_no_states}/step00000001/mp_rank_00_model_states.pt "
     "(DeepSpeed's model states of model-parallel rank 0) is missing"),
    ("convert from-deepspeed --input {emptydir} --output {tmp}/m",
     "argument --input: {emptydir} has no COMPLETE marker"),
    ("convert from-deepspeed --model-config {not_a_coca_json} --input {ckpt} --output {tmp}/m",
     "argument --model-config: model config {not_a_coca_json}: CoCaConfig: unknown keys ['a']"),
    ("convert from-deepspeed --output {a_file} --input {ckpt}",
     "argument --output: output directory {a_file} is a file"),
    ("convert from-deepspeed --input {ckpt} --output {tmp}/m", "records no job config in its client state: pass "
                                                             "--model-config"),
    ("convert", "megacoca convert: error: the following arguments are required: FORMAT"),
]

# A few through the real entry points, as a user runs them (subprocess: nothing shared with this process).
SUBPROCESS_CASES = [
    ("-m megacoca train --set data.num_workers=-1", "megacoca train: error: data.num_workers must be >= 0"),
    ("-m megacoca " + TRAIN + "--set data.tokenizer={not_a_model}",
     "megacoca train: error: data.tokenizer: {not_a_model} is not a SentencePiece model"),
    ("-m megacoca.train --steps x", "python -m megacoca.train: error: argument --steps: invalid int value: 'x'"),
    ("-m megacoca tokenizer encode --tokenizer {not_a_model} hi",
     "megacoca tokenizer encode: error: argument --tokenizer: {not_a_model} is not a SentencePiece model"),
    ("-m megacoca convert from-deepspeed --input {emptydir} --output {tmp}/m",
     "megacoca convert from-deepspeed: error: argument --input: {emptydir} has no COMPLETE marker"),
]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """The good and bad files the table points at."""
    tmp = tmp_path_factory.mktemp("bad_input")
    paths = {"tmp": str(tmp)}

    def write(name: str, text: str) -> None:
        (tmp / name).write_text(text)
        paths[os.path.splitext(name)[0]] = str(tmp / name)

    (tmp / "shards").mkdir()
    for i in range(2):
        tarfile.open(tmp / "shards" / f"{i:05d}.tar", "w").close()  # valid, empty: only the header is checked
    paths["shards"] = str(tmp / "shards")
    (tmp / "emptydir").mkdir()
    paths["emptydir"] = str(tmp / "emptydir")
    (tmp / "label_shards").mkdir()
    with tarfile.open(tmp / "label_shards" / "00000.tar", "w") as tar:  # l0001's class id 7 is out of range
        for key, label in (("l0000", b"1"), ("l0001", b"7")):
            for ext, data in (("jpg", b"never decoded"), ("cls", label)):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    paths["label_shards"] = str(tmp / "label_shards")
    write("names.txt", "cat\ndog\nowl\n")
    write("templates.txt", "a photo of a {c}.\n")
    write("a_file", "a file where a directory belongs\n")
    write("not_a_model.model", "this is not a SentencePiece model\n")
    write("not_a_tar.tar", "this is not a tar archive\n")
    write("empty_tar.tar", "")
    write("bad_yaml.yaml", "optim: [1\n")
    write("list_yaml.yaml", "- 1\n- 2\n")
    write("typo_yaml.yaml", "optim:\n  lrr: 1\n")
    write("ds_not_json.json", "{zero_optimization: 3")
    write("ds_list.json", "[1, 2]")
    for name, values in {
        "ds_stage7": {"zero_optimization": {"stage": 7}},
        "ds_bf16": {"bf16": True},
        "ds_batch": {"train_batch_size": "x"},
        "ds_offload": {"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "gpu"}}},
        "ds_typo": {"zero_optimization": {"stage": 3, "stage3_param_persistance_threshold": 0}},
        "ds_optimizer": {"optimizer": {"type": "Adam"}},
        "ds_no_overflow_check": {"zero_optimization": {"stage": 2}, "bf16": {"enabled": True,
                                                                            "check_grad_overflow": False}},
        "ds_no_grad_norm": {"zero_optimization": {"stage": 1, "compute_grad_norm": False}, "bf16": {"enabled": False}},
        "not_a_coca_json": {"a": 1},
    }.items():
        write(f"{name}.json", json.dumps(values))
    (tmp / "images").mkdir()
    (tmp / "images" / "x.png").write_bytes(b"\x89PNG\r\n\x1a\n")  # only its name is looked at here
    paths["images"] = str(tmp / "images")
    write("captions_no_rows.csv", "file,caption\n")
    write("captions_no_caption.csv", "file,title\nx.png,hello\n")
    (tmp / "bad_model_dir").mkdir()
    (tmp / "bad_model_dir" / "config.json").write_text(json.dumps({"format": "megacoca", "model": {"nope": 1}}))
    paths["bad_model_dir"] = str(tmp / "bad_model_dir")
    for name in ("ckpt", "ckpt_no_states"):  # complete, with an empty module and no job config / without files
        (tmp / name / "step00000001").mkdir(parents=True)
        (tmp / name / "step00000001" / "COMPLETE").write_text("1\n")
        (tmp / name / "latest").write_text("step00000001")
        paths[name] = str(tmp / name)
    import torch

    torch.save({"module": {}, "step": 1}, tmp / "ckpt" / "step00000001" / "mp_rank_00_model_states.pt")
    return paths


@pytest.fixture
def no_launch(monkeypatch, files):
    """A plain single-process run in a scratch directory; a case that passed every check would fail here
    instead of starting to train."""
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(files["tmp"])
    import megacoca.launch.process_group

    def refuse(*args, **kwargs):
        raise AssertionError("the input passed every check: a process group would be made now")

    monkeypatch.setattr(megacoca.launch.process_group, "init_distributed", refuse)


def _one_line(stderr: str) -> str:
    lines = stderr.splitlines()
    assert len(lines) == 1 and lines[0].strip(), f"expected one line on stderr, got {len(lines)}:\n{stderr}"
    return lines[0]


def test_the_table_is_large_enough():
    assert len(CASES) + len(SUBPROCESS_CASES) >= 40
    commands = {command.split()[0] for command, _ in CASES}
    assert commands == {"train", "eval", "data", "tokenizer", "convert"}


@pytest.mark.parametrize("command, fragment", CASES, ids=[f"{i:02d}" for i in range(len(CASES))])
def test_bad_input_is_one_line_and_exit_2(files, no_launch, capsys, command, fragment):
    code = main(shlex.split(command.format(**files)))
    line = _one_line(capsys.readouterr().err)
    assert code == 2, line
    assert line.startswith(f"megacoca {command.split()[0]}"), line
    assert fragment.format(**files) in line, line
    assert "Traceback" not in line


@pytest.mark.parametrize("command, fragment", SUBPROCESS_CASES, ids=[c.split()[1] + "-" + c.split()[2]
                                                                      for c, _ in SUBPROCESS_CASES])
def test_bad_input_from_the_shell(files, command, fragment):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    done = subprocess.run([sys.executable, *shlex.split(command.format(**files))], cwd=files["tmp"], env=env,
                          capture_output=True, text=True, timeout=120)
    line = _one_line(done.stderr)
    assert done.returncode == 2, line
    assert fragment.format(**files) in line, line


def test_a_malformed_fault_spec_is_refused_before_training(files, no_launch, capsys, monkeypatch):
    """MEGACOCA_FAULTS (megacoca.launch.faults) is read at start: a typo is one line, not a fault that never fires."""
    monkeypatch.setenv("MEGACOCA_FAULTS", "nan_loss=two")
    code = main(shlex.split((TRAIN + "--set checkpoint.dir={tmp}/ck").format(**files)))
    line = _one_line(capsys.readouterr().err)
    assert code == 2 and line == "megacoca train: error: MEGACOCA_FAULTS: nan_loss=two: expected [rankR@]STEP"
