"""What a command's values point at, checked before the command does any work: shards, tokenizer, files to
read, directories and files to write, and number ranges of command-line arguments.

`JobConfig.validate` checks the job config's values; the checks here check the files behind them and are
shared by `megacoca train` (naming the config key: `data.tokenizer: ...`) and the other subcommands, whose
arguments use them as argparse types (`type=argument(shards)`: a bad value is then refused while the command
line is parsed, as `megacoca eval: error: argument --shards: ...`). Each failure is a one-line `ConfigError`;
the CLI prints it as `megacoca <command>: error: <message>` and exits with code 2.
"""

from __future__ import annotations

import argparse
import json
import os
import tarfile
import tempfile
from typing import Any, Callable

from megacoca.config.model import CoCaConfig
from megacoca.config.train import ConfigError


def one_line(error: BaseException | str) -> str:
    return " ".join(str(error).split())


def keyed(key: str, check: Callable[..., Any], *args, **kwargs) -> Any:
    """`check(*args)`, its ConfigError prefixed with the config key or argument it is about."""
    try:
        return check(*args, **kwargs)
    except ConfigError as error:
        raise ConfigError(f"{key}: {error}") from None


def argument(check: Callable[[str], Any]) -> Callable[[str], str]:
    """An argparse `type=` from a check: the value is kept as given (the check's result is dropped); a
    ConfigError becomes argparse's own one-line `argument --flag: <message>`."""

    def parse(text: str) -> str:
        try:
            check(text)
        except ConfigError as error:
            raise argparse.ArgumentTypeError(str(error)) from None
        return text

    parse.__name__ = getattr(check, "__name__", "value")
    return parse


# ----------------------------------------------------------------------------------------------- numbers


def at_least(minimum: int) -> Callable[[str], int]:
    """argparse type: an integer >= minimum."""

    def parse(text: str) -> int:
        try:
            value = int(text.replace("_", ""))
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value

    parse.__name__ = f"integer >= {minimum}"
    return parse


def fraction(text: str) -> float:
    """argparse type: a number in [0, 1]."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {text!r}") from None
    if not 0.0 <= value <= 1.0:  # also refuses nan
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {text}")
    return value


# ------------------------------------------------------------------------------------------- files to read


def readable_file(path: str, what: str = "file") -> str:
    if not path:
        raise ConfigError(f"no {what} given (an empty path)")
    if os.path.isdir(path):
        raise ConfigError(f"{what} {path} is a directory, not a file")
    if not os.path.isfile(path):
        raise ConfigError(f"{what} not found: {path}")
    if not os.access(path, os.R_OK):
        raise ConfigError(f"{what} {path} is not readable (permissions)")
    return path


def readable_dir(path: str, what: str = "directory") -> str:
    if not path:
        raise ConfigError(f"no {what} given (an empty path)")
    if os.path.isfile(path):
        raise ConfigError(f"{what} {path} is a file, not a directory")
    if not os.path.isdir(path):
        raise ConfigError(f"{what} not found: {path}")
    if not os.access(path, os.R_OK | os.X_OK):
        raise ConfigError(f"{what} {path} is not readable (permissions)")
    return path


def images_dir(path: str) -> None:
    """A folder with at least one image file (megacoca data from-folder --images); stops at the first found."""
    from megacoca.data.shard_reader import IMAGE_EXTENSIONS  # heavy (webdataset, torch): not at `megacoca --help`

    readable_dir(path, "images folder")
    for _, _, files in os.walk(path):
        if any(name.rsplit(".", 1)[-1].lower() in IMAGE_EXTENSIONS for name in files):
            return
    raise ConfigError(f"images folder {path} holds no images ({', '.join(sorted(IMAGE_EXTENSIONS))})")


def _first_tar_member(path: str) -> None:
    try:
        with tarfile.open(path) as tar:  # reads the first header only (any compression tarfile knows)
            tar.next()
    except (tarfile.TarError, EOFError):
        reason = "an empty file" if os.path.getsize(path) == 0 else "not a tar archive"
        raise ConfigError(f"{path} is not a tar shard ({reason})") from None
    except OSError as error:
        raise ConfigError(f"cannot read shard {path}: {error.strerror or error}") from None


def shards(spec: str) -> list[str]:
    """The urls of a shard spec (`megacoca.data.shard_urls.expand_shards`); every local path must exist and the
    first local shard must open as a tar archive (one header read: checking all of a 10,000-shard set from
    every rank would load the filesystem's metadata server for little gain). Remote urls are not checked."""
    from megacoca.data.shard_urls import expand_shards, is_remote  # heavy (webdataset): not at `--help`

    if not spec:
        raise ConfigError("no shards given (an empty spec): pass a directory of .tar shards, a file or a pattern")
    try:
        urls = expand_shards(spec)
    except (FileNotFoundError, ValueError) as error:
        raise ConfigError(one_line(error)) from None
    local = [url[len("file:"):] if url.startswith("file:") else url for url in urls if not is_remote(url)]
    if local:
        _first_tar_member(local[0])
    return urls


LABEL_CHECK_SAMPLES = 256  # samples of a label source's first shard whose labels are checked before a run


def data_source(source, readers: int = 1, *, strict_labels: bool = True) -> list[str]:
    """A `SourceConfig` / `ValSourceConfig`'s files (megacoca.config.sources): its shards (`shards`), at least
    `readers` of them (dp ranks x workers each read one at least), and for a label source its class-name and
    template files and the labels of the first LABEL_CHECK_SAMPLES samples of its first local shard (headers and
    labels only, no image decoded): with `strict_labels` (a training source) any label out of range is an error,
    and at least one must be present (else the label_field is wrong); without (a validation set, which skips and
    counts bad labels as `megacoca eval` does), one valid label among them is enough. Labels further on that are
    bad are skipped and counted at run time (`bad_label`): reading a whole data set before the start would cost
    more than the run's first minutes. Returns the shard urls."""
    from megacoca.data.shard_reader import read_shard  # heavy (webdataset): not at `--help`
    from megacoca.data.shard_urls import is_remote
    from megacoca.data.source_text import text_rule

    urls = keyed("shards", shards, source.shards)
    if len(urls) < readers:
        raise ConfigError(f"shards: {len(urls)} shards cannot feed {readers} readers (dp ranks x workers, each "
                          "needs >= 1 shard of every source): write more, smaller shards or use fewer workers")
    if source.text != "labels":
        return urls
    rule = text_rule(source)
    local = next((url for url in urls if not is_remote(url)), None)
    if local is None:
        return urls
    field = "the .cls file" if source.label_field == "cls" else f"the .json field {source.label_field!r}"
    labelled = 0
    for index, raw in enumerate(read_shard(local, on_error=lambda error: None)):
        if index >= LABEL_CHECK_SAMPLES:
            break
        label, reason = rule.label(raw)
        if reason == "bad_label" and strict_labels:
            raise ConfigError(f"sample {raw.get('__key__')} of {local}: the label in {field} is out of range or "
                              f"not one of the {len(rule.class_names)} class names of {source.class_names}")
        labelled += reason is None
    if not labelled:
        raise ConfigError(f"none of the first samples of {local} has a valid label in {field}: check label_field "
                          "and class_names")
    return urls


def tokenizer(spec: str, context_length: int | None = None):
    """The tokenizer a spec names ("clip-bpe" or a SentencePiece .model file), loaded; one line if it cannot be."""
    from megacoca.data.tokenizer import open_tokenizer  # heavy: imports torch

    return open_tokenizer(spec, context_length)


def json_file(path: str, what: str = "JSON file") -> Any:
    readable_file(path, what)
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except (ValueError, UnicodeDecodeError) as error:  # JSONDecodeError is a ValueError
        raise ConfigError(f"cannot parse {what} {path}: {one_line(error)}") from None


def captions_file(path: str) -> None:
    """A .csv/.tsv/.jsonl captions file whose first row has an image and a caption column."""
    from megacoca.data.from_folder import read_caption_file  # heavy (torch): not at `megacoca --help`

    readable_file(path, "captions file")
    try:
        first = next(iter(read_caption_file(path)), None)
    except (ValueError, UnicodeDecodeError) as error:  # a bad extension, no such column, not JSON, not UTF-8
        raise ConfigError(one_line(error) if path in str(error) else f"{path}: {one_line(error)}") from None
    except (TypeError, AttributeError, KeyError):  # a JSON line that is not an object
        raise ConfigError(f"{path}: each line must be a JSON object with an image and a caption key") from None
    if first is None:
        raise ConfigError(f"captions file {path} has no rows")


# ------------------------------------------------------------------------------------------ paths to write


def _nearest_existing(path: str) -> str:
    current = os.path.abspath(path)
    while not os.path.exists(current):
        parent = os.path.dirname(current)
        if parent == current:
            break
        current = parent
    return current


def _can_write_in(directory: str) -> str | None:
    """None when a file can be made in `directory` (tried: permission bits say nothing to root, nor about
    read-only mounts or /proc), else the reason. An unnamed temporary file: nothing is left behind."""
    try:
        with tempfile.TemporaryFile(dir=directory):
            pass
    except OSError as error:
        return error.strerror or str(error)
    return None


def writable_dir(path: str, what: str = "directory") -> None:
    """A directory that exists and is writable, or can be made (its nearest existing ancestor is a writable
    directory). Nothing is created here."""
    if not path:
        raise ConfigError(f"no {what} given (an empty path)")
    if os.path.exists(path):
        if not os.path.isdir(path):
            raise ConfigError(f"{what} {path} is a file, not a directory")
        reason = _can_write_in(path)
        if reason:
            raise ConfigError(f"{what} {path} is not writable ({reason})")
        return
    ancestor = _nearest_existing(path)
    if not os.path.isdir(ancestor):
        raise ConfigError(f"cannot create {what} {path}: {ancestor} is a file")
    reason = _can_write_in(ancestor)
    if reason:
        raise ConfigError(f"cannot create {what} {path}: {ancestor} is not writable ({reason})")


def output_file(path: str, what: str = "output file") -> None:
    """A file to write: not a directory, in a directory that exists writable or can be made."""
    if not path:
        raise ConfigError(f"no {what} given (an empty path)")
    if os.path.isdir(path):
        raise ConfigError(f"{what} {path} is a directory")
    if os.path.exists(path) and not os.access(path, os.W_OK):
        raise ConfigError(f"{what} {path} is not writable (permissions)")
    writable_dir(os.path.dirname(os.path.abspath(path)), f"directory of the {what}")


def _int_at_least(text: str, lowest: int, expected: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise ConfigError(f"expected {expected}, got {text!r}") from None
    if value < lowest:
        raise ConfigError(f"expected {expected}, got {value}")
    return value


def positive_int(text: str) -> int:
    return _int_at_least(text, 1, "a positive integer")


def non_negative_int(text: str) -> int:
    return _int_at_least(text, 0, "an integer >= 0")


def assignments(items: list[str], flag: str, expected: str, require_key: bool = False) -> dict:
    """{key: value} of repeated `flag KEY=VALUE` arguments, each value read as JSON where it parses (numbers,
    booleans, lists) and kept as text otherwise; an item without `=` (or, `require_key`, without a key) is a
    one-line ConfigError saying `expected`."""
    out = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or (require_key and not key):
            raise ConfigError(f"{flag} {item!r}: expected {expected}")
        try:
            out[key] = json.loads(text)
        except json.JSONDecodeError:
            out[key] = text
    return out


def output_dir(path: str) -> None:
    writable_dir(path, "output directory")


# ------------------------------------------------------------------------------------ models and checkpoints


def weights_file(path: str) -> None:
    """A state-dict file by its first bytes: torch.save's zip, a legacy pickle, or .safetensors (whose 8-byte
    header length is followed by a JSON header). The content is read later, by the command."""
    readable_file(path, "weights file")
    with open(path, "rb") as handle:
        head = handle.read(9)
    if path.endswith(".safetensors"):
        if len(head) < 9 or head[8:9] != b"{":
            raise ConfigError(f"{path} is not a .safetensors file (no JSON header)")
    elif not (head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"):
        raise ConfigError(f"{path} is not a state dict written by torch.save (.pt/.bin) nor a .safetensors file")


def open_clip_model(spec: str) -> None:
    """An open_clip CoCa model name or model-config JSON that megacoca can express (checked on the config alone)."""
    from megacoca.models.coca.open_clip import config_from_open_clip  # heavy (torch): not at `--help`

    if spec.endswith(".json") or os.path.isfile(spec):
        json_file(spec, "open_clip model config")
    try:
        config_from_open_clip(spec)
    except KeyError as error:
        raise ConfigError(f"{spec} is not an open_clip CoCa model config (no {error} key)") from None
    except (ValueError, TypeError, ImportError) as error:
        raise ConfigError(one_line(error)) from None


def model_dir(path: str) -> None:
    """A megacoca model directory: config.json (a CoCaConfig megacoca reads) and model.safetensors."""
    from megacoca.models.coca.loading import read_config  # heavy (torch): not at `megacoca --help`

    readable_dir(path, "model directory")
    try:
        config = read_config(path)
    except FileNotFoundError as error:
        raise ConfigError(one_line(error)) from None
    except ValueError as error:  # JSONDecodeError is a ValueError
        raise ConfigError(f"{path}/config.json: {one_line(error)}") from None
    try:
        CoCaConfig.from_dict(config["model"])
    except (ValueError, KeyError, TypeError) as error:
        raise ConfigError(f"{path}/config.json: not a megacoca model config ({one_line(error)})") from None
    readable_file(os.path.join(path, "model.safetensors"), "model weights")


def model_config_file(path: str) -> None:
    """A CoCaConfig JSON, or a model directory's config.json (megacoca convert from-deepspeed --model-config)."""
    config_path = os.path.join(path, "config.json") if os.path.isdir(path) else path
    values = json_file(config_path, "model config")
    if isinstance(values, dict) and values.get("format") == "megacoca":
        values = values.get("model")
    if not isinstance(values, dict):
        raise ConfigError(f"model config {config_path}: expected a JSON object of CoCaConfig fields")
    try:
        CoCaConfig.from_dict(values)
    except (ValueError, TypeError) as error:
        raise ConfigError(f"model config {config_path}: {one_line(error)}") from None


def deepspeed_checkpoint(path: str) -> None:
    """A complete megacoca DeepSpeed checkpoint: a tag directory, or a checkpoint directory with `latest` (every file
    of its layout there; their contents are checked once, when the checkpoint is read)."""
    # heavy (torch, DeepSpeed): not at `megacoca --help`
    from megacoca.checkpoint.reshape import find_layout_free
    from megacoca.checkpoint.tags import locate_tag

    readable_dir(path, "checkpoint directory")
    if find_layout_free(path) is not None:  # `megacoca convert reshape`'s output
        return
    try:
        locate_tag(path)
    except (FileNotFoundError, ValueError) as error:
        raise ConfigError(one_line(error)) from None


def model_source(path: str) -> None:
    """What megacoca.checkpoint.loader opens: a model directory, an open_clip directory (open_clip_config.json) or
    a complete DeepSpeed checkpoint (a directory with `latest`, or a tag directory)."""
    readable_dir(path, "model directory or checkpoint")
    if os.path.isfile(os.path.join(path, "config.json")):
        return model_dir(path)
    if os.path.isfile(os.path.join(path, "open_clip_config.json")):
        json_file(os.path.join(path, "open_clip_config.json"), "open_clip model config")
        return None
    if any(os.path.isfile(os.path.join(path, name)) for name in ("latest", "COMPLETE")):
        return deepspeed_checkpoint(path)
    raise ConfigError(f"{path} is not a megacoca model directory (no config.json), an open_clip directory (no "
                      "open_clip_config.json) or a DeepSpeed checkpoint (no `latest`, no COMPLETE)")


def open_clip_output(path: str) -> None:
    """Where `megacoca convert to-open-clip` writes: a directory, or a state-dict file (.safetensors / .pt)."""
    if path.endswith((".safetensors", ".pt")):
        return output_file(path)
    return writable_dir(path, "output directory")

