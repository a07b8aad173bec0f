"""Data sources: the training mixture (`data.sources`) and the named validation sets (`eval.val_sources`).

A source is a set of webdataset shards and how each sample's text is made from it:
- `text: caption`: the sample's caption, its `.txt` (or, with `caption_field`, a string field of its `.json`);
- `text: labels`: its class label (`label_field`: `cls` reads the `.cls` file, an integer; any other name reads
  that field of the `.json`, an integer id or a class name) rendered through a caption template drawn per sample
  (deterministically: megacoca.data.source_text), as the CoCa paper uses JFT's label names as text. Class names
  and templates are files (`class_names`: one name per line or a JSON list; `templates`: one per line or a JSON
  list, each with `{}` or `{c}` where the name goes: open_clip's ImageNet names and templates written out so).

A training source also has a `weight` (its share of every batch, relative to the others'). The checks here need
no file; megacoca.cli.inputs checks the files behind them (shards exist, label files readable, label ids in range).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from megacoca.config.overrides import ConfigError

LABEL_FILE_FIELD = "cls"  # label_field that means the sample's `.cls` file


@dataclass
class ValSourceConfig:
    name: str = ""
    shards: str = ""  # a directory of .tar shards, a glob, a brace pattern, or remote urls (`pipe:`, http)
    text: Literal["caption", "labels"] = "caption"
    caption_field: str = ""  # "": the `.txt`; else a string field of the `.json`
    label_field: str = LABEL_FILE_FIELD  # "cls": the `.cls` file; else a `.json` field (an integer id or a name)
    class_names: str = ""  # text: labels: a file of class names (one per line, or a JSON list)
    templates: str = ""  # text: labels: a file of caption templates with `{}` or `{c}` (one per line, or JSON)
    max_samples: int = 0  # eval only: evaluate the first N samples (0: all)


@dataclass
class SourceConfig(ValSourceConfig):
    weight: float = 1.0  # relative share of every batch (the weights need not sum to 1)


def check_sources(sources: list, key: str, *, weighted: bool) -> None:
    """One ConfigError line for the first bad source of `sources` (the config key `key`, e.g. `data.sources`):
    a missing or repeated name, no shards, a weight that is not a positive finite number, an unknown text kind,
    a label source without class names or templates."""
    seen: set[str] = set()
    for index, source in enumerate(sources):
        where = f"{key}[{index}]"
        name = source.name.strip()
        if not name:
            raise ConfigError(f"{where}.name is empty: every source needs a name (it labels its metrics)")
        where = f"{key}[{index}] ({name!r})"
        if name in seen:
            raise ConfigError(f"{where}: duplicate source name {name!r}: names must be unique")
        seen.add(name)
        if any(c in name for c in " /\t\n|,="):
            raise ConfigError(f"{where}.name must not contain spaces, '/', '|', ',' or '=' (it names metrics)")
        if not source.shards:
            raise ConfigError(f"{where}.shards is empty: give a directory of .tar shards or a brace pattern")
        if weighted:
            weight = source.weight
            if not (isinstance(weight, (int, float)) and math.isfinite(weight) and weight > 0):
                raise ConfigError(f"{where}.weight must be a number > 0, got {weight!r}")
        if source.text not in ("caption", "labels"):
            raise ConfigError(f"{where}.text must be 'caption' or 'labels', got {source.text!r}")
        if source.text == "labels":
            for field_name in ("class_names", "templates"):
                if not getattr(source, field_name):
                    raise ConfigError(f"{where}: a label source needs {field_name} (a file: one per line, or a "
                                      "JSON list)")
            if not source.label_field:
                raise ConfigError(f"{where}.label_field is empty: 'cls' (the .cls file) or a .json field name")
        if source.max_samples < 0:
            raise ConfigError(f"{where}.max_samples must be >= 0 (0: all), got {source.max_samples}")
