"""The mixture loader (megacoca.data.mixture): proportions, per-source epochs, exact resume, re-split, label text."""

import itertools
import os

import numpy as np
import pytest
from webdataset import TarWriter

from megacoca.config.sources import SourceConfig
from megacoca.data.mixture import MixtureLoader, MixtureMirror
from megacoca.data.mixture_schedule import mixture_offset, slot_sources, thresholds
from megacoca.data.source_text import LabelText
from tests.unit.data.conftest import StubTokenizer, jpeg_bytes, write_shards


def _transform(image, rng=None):
    import torch

    return torch.from_numpy(np.asarray(image, dtype=np.float32)).permute(2, 0, 1)[:, :4, :4]


def _sources(tmp_path, spec):
    """spec: [(name, shards, per_shard, weight)] -> SourceConfigs over freshly written shards."""
    out = []
    for name, shards, per_shard, weight in spec:
        write_shards(tmp_path / name, shards, per_shard, prefix=f"{name}-")
        out.append(SourceConfig(name=name, shards=str(tmp_path / name), weight=weight))
    return out


def _loader(sources, batch=8, rank=0, dp=1, workers=0, seed=0, rules=None, **kwargs):
    return MixtureLoader(sources, rules or {}, batch, StubTokenizer(), _transform, dp_rank=rank, dp_size=dp,
                         num_workers=workers, seed=seed, shuffle_buffer=4, **kwargs)


def _take(loader, count):
    return [b["keys"] for b in itertools.islice(iter(loader), count)]


def test_schedule_holds_proportions_in_every_window():
    """20k slots of 0.5/0.3/0.2: overall and in every window of 100 batches of 32 (and every single batch), each
    source's count is within a binomial 3-sigma band (the Weyl interleaving keeps it within 2 samples)."""
    weights = [0.5, 0.3, 0.2]
    owners = slot_sources(0, 20_000, thresholds(weights), mixture_offset(7))
    for window in (20_000, 100 * 32, 32):
        for start in range(0, 20_000 - window + 1, 32):
            counts = np.bincount(owners[start:start + window], minlength=3)
            for share, count in zip(weights, counts):
                sigma = (window * share * (1 - share)) ** 0.5
                assert abs(count - window * share) <= max(3 * sigma, 2), (window, start, counts)
    assert slot_sources(10**15, 4, thresholds(weights), 7).tolist() == slot_sources(10**15, 4, thresholds(weights),
                                                                                     7).tolist()


def test_loader_holds_proportions_over_20k_samples(tmp_path):
    """The issue's check through the loader itself: 20k samples (625 batches of 32) of 0.5/0.3/0.2, each source's
    share within binomial tolerance overall and in every window of 100 batches."""
    sources = _sources(tmp_path, [("a", 2, 40, 0.5), ("b", 2, 30, 0.3), ("c", 2, 20, 0.2)])
    owners = np.array([[ord(name) - ord("a") for name in b["sources"]]
                       for b in itertools.islice(iter(_loader(sources, batch=32, seed=3)), 625)])
    for window in (625, 100):
        for start in range(0, 625 - window + 1):
            counts = np.bincount(owners[start:start + window].ravel(), minlength=3)
            total = window * 32
            for share, count in zip((0.5, 0.3, 0.2), counts):
                assert abs(count - total * share) <= 3 * (total * share * (1 - share)) ** 0.5, (window, start)


def test_loader_draws_by_weight_and_sources_roll_their_own_epochs(tmp_path):
    """A small source reused many times while a large one is read once: per-source epochs advance separately; each
    batch holds the sources in proportion; every sample of a source is read once per its epoch."""
    sources = _sources(tmp_path, [("big", 4, 50, 0.5), ("small", 2, 5, 0.3), ("tiny", 2, 3, 0.2)])
    loader = _loader(sources)
    batches = list(itertools.islice(iter(loader), 25))  # 200 samples
    names = [name for b in batches for name in b["sources"]]
    assert [names.count(n) for n in ("big", "small", "tiny")] == pytest.approx([100, 60, 40], abs=2)
    for b in batches:
        assert all(key.startswith(f"{name}-") for key, name in zip(b["keys"], b["sources"]))
    small = [k for b in batches for k, n in zip(b["keys"], b["sources"]) if n == "small"]
    assert sorted(small[:10]) == sorted(f"small-{i:06d}" for i in range(10))  # one epoch = each sample once
    account = loader.accounting()
    assert account["small"]["epochs"] >= 5 and account["big"]["epochs"] == 0
    assert sum(a["samples"] for a in account.values()) == 200


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_is_exact(tmp_path, workers):
    """Stop after k batches, save, new loader, load: the next batches are the uninterrupted run's, bit for bit."""
    sources = _sources(tmp_path, [("a", 4, 9, 0.5), ("b", 4, 7, 0.3), ("c", 4, 5, 0.2)])
    reference = _take(_loader(sources, workers=workers), 14)
    for k in (1, 5, 9):
        first = _loader(sources, workers=workers)
        assert _take(first, k) == reference[:k]
        second = _loader(sources, workers=workers)
        second.load_state_dict(first.state_dict())
        assert _take(second, 14 - k) == reference[k:], k


def test_resplit_reads_every_unread_sample_once(tmp_path):
    """dp 2 -> 1 mid-epoch: the union of what the old ranks read and what the new rank reads until every source
    finished its started epoch holds every sample of that epoch exactly once."""
    sources = _sources(tmp_path, [("a", 4, 10, 0.6), ("b", 4, 6, 0.4)])
    old = [_loader(sources, batch=4, rank=r, dp=2) for r in range(2)]
    seen = {"a": [], "b": []}
    for loader in old:
        for b in itertools.islice(iter(loader), 3):
            for key, name in zip(b["keys"], b["sources"]):
                seen[name].append(key)
    states = [loader.state_dict() for loader in old]
    new = _loader(sources, batch=4, rank=0, dp=1)
    new.load_resplit_state(states)
    epoch0 = {"a": {f"a-{i:06d}" for i in range(40)}, "b": {f"b-{i:06d}" for i in range(24)}}
    for b in itertools.islice(iter(new), 40):
        for key, name in zip(b["keys"], b["sources"]):
            seen[name].append(key)
    for name in ("a", "b"):
        first_epoch = seen[name][:len(epoch0[name])]
        assert sorted(first_epoch) == sorted(epoch0[name]), name  # each once, none twice
    assert sum(new.accounting()[n]["samples"] for n in ("a", "b")) == 2 * 3 * 4 + 40 * 4  # totals kept


def test_weights_may_change_on_resume(tmp_path):
    sources = _sources(tmp_path, [("a", 2, 20, 0.5), ("b", 2, 20, 0.5)])
    first = _loader(sources)
    _take(first, 3)
    sources[0].weight, sources[1].weight = 0.9, 0.1
    second = _loader(sources)
    second.load_state_dict(first.state_dict())
    assert second.changes == ["data mixture: weights changed from global sample 24: a 0.5 -> 0.9, b 0.5 -> 0.1"]
    names = [n for b in itertools.islice(iter(second), 10) for n in b["sources"]]
    assert names.count("a") == pytest.approx(72, abs=2)


def test_added_and_removed_sources_are_said_and_kept(tmp_path):
    sources = _sources(tmp_path, [("a", 2, 20, 0.5), ("b", 2, 20, 0.5), ("c", 2, 20, 0.5)])
    first = _loader(sources[:2])
    _take(first, 3)
    second = _loader([sources[0], sources[2]])
    second.load_state_dict(first.state_dict())
    assert any("sources added" in line and "c" in line for line in second.changes)
    assert any("sources removed" in line and "b" in line for line in second.changes)
    third = _loader(sources[:2])  # b comes back where it stopped
    third.load_state_dict(second.state_dict())
    assert third.state_dict()["sources"]["b"] == first.state_dict()["sources"]["b"]


def test_single_source_state_is_refused_with_one_line(tmp_path):
    from megacoca.data.shards import ShardLoader

    sources = _sources(tmp_path, [("a", 2, 4, 1.0)])
    single = ShardLoader(sources[0].shards, 4, StubTokenizer(), _transform)
    with pytest.raises(ValueError, match="single source's"):
        _loader(sources).load_state_dict(single.state_dict())
    with pytest.raises(ValueError, match="a mixture's"):
        single.load_state_dict(_loader(sources).state_dict())
    with pytest.raises(ValueError, match="a mixture's"):
        single.load_resplit_state([_loader(sources).state_dict()])


def test_mirror_holds_the_reading_position(tmp_path):
    sources = _sources(tmp_path, [("a", 2, 6, 0.5), ("b", 2, 6, 0.5)])
    loader = _loader(sources)
    _take(loader, 4)
    mirror = MixtureMirror(sources, 8)
    mirror.mirror(loader.state_dict())
    assert mirror.state_dict() == loader.state_dict()
    with pytest.raises(TypeError):
        iter(mirror)


def _write_label_shards(directory, count, bad=()):
    os.makedirs(directory, exist_ok=True)
    with TarWriter(os.path.join(str(directory), "00000.tar"), mtime=0) as writer:
        for i in range(count):
            sample = {"__key__": f"l{i:04d}", "jpg": jpeg_bytes(i), "cls": str(99 if i in bad else i % 3).encode()}
            writer.write(sample)


def test_label_source_renders_templates_deterministically(tmp_path):
    _write_label_shards(tmp_path / "lab", 12, bad={5})
    _write_label_shards(tmp_path / "lab2", 12)
    sources = [SourceConfig(name="lab", shards=str(tmp_path / "lab"), text="labels"),
               SourceConfig(name="lab2", shards=str(tmp_path / "lab2"), text="labels")]
    rule = LabelText(["cat", "dog", "owl"], ["a photo of a {c}.", "a {} in the wild"], seed=0, name="lab")
    loader = _loader(sources, batch=4, rules={"lab": rule, "lab2": rule})
    batches = list(itertools.islice(iter(loader), 6))
    captions = [c for b in batches for c in b["captions"]]
    assert all(c in {t.replace("{c}", n).replace("{}", n) for t in rule.templates for n in rule.class_names}
               for c in captions)
    assert {"a photo of a cat.", "a dog in the wild"} & set(captions)
    assert loader.skipped["bad_label"] >= 1
    again = [c for b in itertools.islice(iter(_loader(sources, batch=4, rules={"lab": rule, "lab2": rule})), 6)
             for c in b["captions"]]
    assert again == captions


def test_a_dead_source_stops_the_run_or_is_dropped(tmp_path):
    sources = _sources(tmp_path, [("a", 2, 10, 0.5)])
    _write_label_shards(tmp_path / "bad", 6, bad=set(range(6)))
    sources.append(SourceConfig(name="bad", shards=str(tmp_path / "bad"), text="labels"))
    rules = {"bad": LabelText(["x", "y", "z"], ["{c}"])}
    with pytest.raises(RuntimeError, match="data source 'bad'"):
        _take(_loader(sources, batch=4, rules=rules), 3)
    loader = _loader(sources, batch=4, rules=rules, on_source_failure="drop")
    batches = _take(loader, 5)
    assert all(key.startswith("a-") for keys in batches for key in keys)
    assert loader.state_dict()["dead"] == {"bad": [0]}
    resumed = _loader(sources, batch=4, rules=rules, on_source_failure="drop")
    resumed.load_state_dict(loader.state_dict())
    assert _take(resumed, 2) == _take(_loader(sources, batch=4, rules=rules, on_source_failure="drop"), 7)[5:]
