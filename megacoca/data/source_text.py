"""How a source's samples get their text (megacoca.config.sources): captions, or class labels through templates.

`text_rule(source, seed)` gives a picklable rule with `text(raw, epoch, shard, index) -> (text, None)` or
`(None, skip reason)` for one raw sample (megacoca.data.shard_reader's dict), used by the training streams
(megacoca.data.streams) and the eval sets (megacoca.eval):
- `CaptionText`: the `.txt` (exactly `decode_caption`), or a string field of the `.json`;
- `LabelText`: the class id from the `.cls` file or a `.json` field (an integer id, or a class name), rendered
  through one of the templates. Which template is drawn from (seed, source name, epoch, shard, sample index), so
  a resumed or re-split run renders every sample exactly as an uninterrupted one. `label(raw)` gives the id alone
  (zero-shot evaluation).

Class-name and template files: UTF-8, one entry per line (blank lines and lines starting with `#` ignored), or a
JSON list of strings. A template holds `{}` or `{c}` where the class name goes (open_clip's ImageNet templates,
`lambda c: f"a photo of a {c}."`, written as `a photo of a {c}.`).
"""

from __future__ import annotations

import json
import os
import random
from typing import Any

from megacoca.config.overrides import ConfigError
from megacoca.config.sources import LABEL_FILE_FIELD
from megacoca.data.shard_reader import decode_caption

LABEL_SKIP_REASONS = ("missing_label", "bad_label")  # no label; a label id out of range or an unknown class name


def read_list_file(path: str, what: str) -> list[str]:
    """The entries of a class-name or template file (see the module doc); ConfigError (one line) if it cannot be
    read, is empty, or is a JSON value other than a list of strings."""
    if not os.path.isfile(path):
        raise ConfigError(f"{what} file not found: {path}")
    try:
        with open(path, encoding="utf-8") as handle:
            content = handle.read()
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"{what} file {path} cannot be read as UTF-8 text: {error}") from None
    if content.lstrip().startswith("["):
        try:
            entries = json.loads(content)
        except ValueError as error:
            raise ConfigError(f"{what} file {path} starts with '[' but is not a JSON list: {error}") from None
        if not all(isinstance(entry, str) for entry in entries):
            raise ConfigError(f"{what} file {path}: a JSON list of strings expected")
        entries = [entry.strip() for entry in entries]
    else:
        entries = [line.strip() for line in content.splitlines()]
        entries = [line for line in entries if line and not line.startswith("#")]
    if not entries or not all(entries):
        raise ConfigError(f"{what} file {path} lists no {what} (or an empty one)")
    return entries


def read_class_names(path: str) -> list[str]:
    """The class names of a file, in id order. A name may repeat (open_clip's ImageNet list names two classes
    "missile"): ids are what `.cls` labels give; a label given as a name takes the first class of that name."""
    return read_list_file(path, "class names")


def read_templates(path: str) -> list[str]:
    templates = read_list_file(path, "templates")
    bad = [t for t in templates if "{}" not in t and "{c}" not in t]
    if bad:
        raise ConfigError(f"templates file {path}: {bad[0]!r} has no '{{}}' or '{{c}}' for the class name")
    return templates


def render(template: str, name: str) -> str:
    """`template` with the class name in its `{}` / `{c}`."""
    return template.replace("{c}", name).replace("{}", name)


def _json_of(raw: dict[str, Any]) -> dict | None:
    data = raw.get("json")
    if data is None:
        return None
    try:
        value = json.loads(bytes(data).decode("utf-8") if not isinstance(data, str) else data)
    except (UnicodeDecodeError, ValueError):
        return None
    return value if isinstance(value, dict) else None


class CaptionText:
    """A caption source's text: the `.txt` (`field` ""), or the string `field` of the `.json`."""

    def __init__(self, field: str = ""):
        self.field = field

    def text(self, raw: dict[str, Any], epoch: int = 0, shard: int = 0, index: int = 0):
        if not self.field:
            return decode_caption(raw)
        meta = _json_of(raw)
        value = None if meta is None else meta.get(self.field)
        if not isinstance(value, str):
            return None, "missing_caption"
        value = value.strip()
        return (value, None) if value else (None, "empty_caption")


class LabelText:
    """A label source's text: class `label(raw)` rendered through a template drawn per sample (module doc)."""

    def __init__(self, class_names: list[str], templates: list[str], *, field: str = LABEL_FILE_FIELD,
                 seed: int = 0, name: str = ""):
        self.class_names, self.templates = list(class_names), list(templates)
        self.field, self.seed, self.name = field, int(seed), name
        self.index_of: dict[str, int] = {}
        for i, class_name in enumerate(self.class_names):
            self.index_of.setdefault(class_name, i)  # a repeated name: its first class

    def label(self, raw: dict[str, Any]) -> tuple[int | None, str | None]:
        """(class id, None) or (None, "missing_label" / "bad_label")."""
        if self.field == LABEL_FILE_FIELD:
            data = raw.get(LABEL_FILE_FIELD)
            if data is None:
                return None, "missing_label"
            try:
                value: Any = int(bytes(data).decode("ascii").strip() if not isinstance(data, str) else data)
            except (UnicodeDecodeError, ValueError):
                return None, "bad_label"
        else:
            meta = _json_of(raw)
            if meta is None or self.field not in meta:
                return None, "missing_label"
            value = meta[self.field]
        if isinstance(value, str):
            value = self.index_of.get(value.strip())
            return (value, None) if value is not None else (None, "bad_label")
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < len(self.class_names):
            return None, "bad_label"
        return value, None

    def template_index(self, epoch: int, shard: int, index: int) -> int:
        if len(self.templates) == 1:
            return 0
        return random.Random(f"megacoca-template:{self.seed}:{self.name}:{epoch}:{shard}:{index}").randrange(
            len(self.templates))

    def text(self, raw: dict[str, Any], epoch: int = 0, shard: int = 0, index: int = 0):
        label, reason = self.label(raw)
        if reason is not None:
            return None, reason
        return render(self.templates[self.template_index(epoch, shard, index)], self.class_names[label]), None


def text_rule(source, seed: int = 0) -> CaptionText | LabelText:
    """The rule of a `SourceConfig` / `ValSourceConfig` (its class-name and template files read and checked:
    ConfigError naming the source)."""
    if source.text != "labels":
        return CaptionText(source.caption_field)
    try:
        names, templates = read_class_names(source.class_names), read_templates(source.templates)
    except ConfigError as error:
        raise ConfigError(f"source {source.name!r}: {error}") from None
    return LabelText(names, templates, field=source.label_field, seed=seed, name=source.name)
