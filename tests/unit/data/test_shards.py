import io
import json
import os

import pytest
import torch
from webdataset import TarWriter

from megacoca.data.shards import ShardLoader, expand_shards, iter_samples
from megacoca.data.transforms import ImageTransform

from .conftest import StubTokenizer, jpeg_bytes, write_shards

SIZE = 8


def make_loader(spec, batch_size=4, **kw):
    kw.setdefault("transform", ImageTransform(SIZE, train=True))
    kw.setdefault("tokenizer", StubTokenizer())
    kw.setdefault("shuffle_buffer", 5)
    return ShardLoader(spec, batch_size, **kw)


def take(loader, n):
    out = []
    for batch in loader:
        out.append(batch)
        if len(out) == n:
            break
    return out


def keys_of(batches):
    return [b["keys"] for b in batches]


# ---- shard specs ------------------------------------------------------------------------------------
def test_expand_shards_forms(tmp_path):
    paths, _ = write_shards(tmp_path / "d", 3, 2)
    assert expand_shards(str(tmp_path / "d")) == paths
    assert expand_shards(str(tmp_path / "d" / "{00000..00002}.tar")) == paths
    assert expand_shards([paths[2], paths[0]]) == [paths[2], paths[0]]
    assert expand_shards(f"{paths[0]}::{paths[1]}") == paths[:2]
    assert expand_shards(tmp_path / "d" / "00001.tar") == [paths[1]]
    remote = ["https://example.com/{000..001}.tar", "pipe:cat x.tar"]
    assert expand_shards(remote) == ["https://example.com/000.tar", "https://example.com/001.tar", "pipe:cat x.tar"]


def test_missing_shard_is_a_one_line_error_at_build_time(tmp_path):
    paths, _ = write_shards(tmp_path / "d", 2, 2)
    missing = str(tmp_path / "d" / "00009.tar")
    with pytest.raises(FileNotFoundError) as info:
        make_loader([paths[0], missing])
    assert str(info.value) == f"shard not found: {missing}"
    with pytest.raises(FileNotFoundError, match="no shards"):
        os.makedirs(tmp_path / "empty")
        make_loader(str(tmp_path / "empty"))


def test_too_few_shards_for_ranks_and_workers(tmp_path):
    paths, _ = write_shards(tmp_path / "d", 3, 2)
    with pytest.raises(ValueError, match=r"3 shards cannot feed dp_size=2 x num_workers=2"):
        make_loader(paths, dp_rank=0, dp_size=2, num_workers=2)


# ---- order -------------------------------------------------------------------------------------------
def test_deterministic_for_a_seed(tmp_path):
    paths, _ = write_shards(tmp_path / "d", 4, 6)
    a = take(make_loader(paths, seed=3), 8)
    b = take(make_loader(paths, seed=3), 8)
    c = take(make_loader(paths, seed=4), 8)
    assert keys_of(a) == keys_of(b)
    assert all(torch.equal(x["images"], y["images"]) for x, y in zip(a, b))
    assert keys_of(a) != keys_of(c)
    batch = a[0]
    assert batch["images"].shape == (4, 3, SIZE, SIZE) and batch["images"].dtype == torch.float32
    assert batch["text"].shape == (4, 16) and batch["text"].dtype == torch.long
    assert [b.split(" ")[1] for b in batch["captions"]] == [k[1:].lstrip("0") or "0" for k in batch["keys"]]


@pytest.mark.parametrize("num_workers", [0, 2])
def test_ranks_and_workers_are_disjoint_and_cover_everything(tmp_path, num_workers):
    paths, keys = write_shards(tmp_path / "d", 8, [3, 4, 5, 3, 4, 5, 3, 4])
    seen = []
    for rank in range(2):
        loader = make_loader(paths, batch_size=1, dp_rank=rank, dp_size=2, num_workers=num_workers, epochs=1)
        rank_keys = [k for batch in loader for k in batch["keys"]]
        assert len(rank_keys) == len(set(rank_keys))
        seen.append(set(rank_keys))
        assert sum(1 for url in loader.rank_shards(0) for _ in iter_samples(url)) == len(rank_keys)
    assert not seen[0] & seen[1]
    assert seen[0] | seen[1] == set(keys)


def test_workers_read_disjoint_shards(tmp_path):
    paths, _ = write_shards(tmp_path / "d", 4, 6)
    loader = make_loader(paths, num_workers=2, seed=1)
    streams = loader._streams
    for epoch in range(3):
        a, b = streams.stream_shards(epoch, 0), streams.stream_shards(epoch, 1)
        assert not set(a) & set(b) and sorted(a + b) == [0, 1, 2, 3]
    assert streams.epoch_order(0) != streams.epoch_order(1) or streams.epoch_order(1) != streams.epoch_order(2)


def test_finite_epochs_and_no_shuffle(tmp_path):
    paths, keys = write_shards(tmp_path / "d", 2, 5)
    loader = make_loader(paths, batch_size=3, shuffle=False, epochs=1, with_json=True)
    batches = list(loader)
    assert [k for b in batches for k in b["keys"]] == keys[:9]  # batches span shards; the partial one drops
    assert batches[0]["json"] == [{"i": 0}, {"i": 1}, {"i": 2}]
    two = [k for b in make_loader(paths, batch_size=3, shuffle=False, epochs=2) for k in b["keys"]]
    assert two == (keys + keys)[:18]  # epochs roll over inside a stream
    assert [k for b in loader for k in b["keys"]] == keys[:9]  # a finished finite loader starts a new pass


# ---- exact resume ------------------------------------------------------------------------------------
@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_continues_with_exactly_the_next_batches(tmp_path, num_workers):
    # 4 shards x 5 samples, batch 3: 20 batches span several epochs for every stream.
    paths, _ = write_shards(tmp_path / "d", 4, 5)
    total = 20
    reference = take(make_loader(paths, batch_size=3, num_workers=num_workers, seed=7), total)
    for k in (1, 5, 8):
        first = make_loader(paths, batch_size=3, num_workers=num_workers, seed=7)
        assert keys_of(take(first, k)) == keys_of(reference[:k])
        state = json.loads(json.dumps(first.state_dict()))  # plain data: survives a checkpoint
        resumed = make_loader(paths, batch_size=3, num_workers=num_workers, seed=7)
        resumed.load_state_dict(state)
        rest = take(resumed, total - k)
        assert keys_of(rest) == keys_of(reference[k:]), f"resume after {k} batches"
        assert all(torch.equal(x["images"], y["images"]) for x, y in zip(rest, reference[k:]))
    assert max(s["epoch"] for s in resumed.state_dict()["streams"]) >= 2  # crossed epoch boundaries


def test_resume_twice_in_a_row_and_state_after_iteration(tmp_path):
    paths, _ = write_shards(tmp_path / "d", 3, 4)
    reference = keys_of(take(make_loader(paths, batch_size=5, seed=2), 9))
    loader = make_loader(paths, batch_size=5, seed=2)
    got = keys_of(take(loader, 2))
    got += keys_of(take(loader, 3))  # a new iter() continues from the loader's own position
    again = make_loader(paths, batch_size=5, seed=2)
    again.load_state_dict(loader.state_dict())
    got += keys_of(take(again, 4))
    assert got == reference
    assert again.state_dict()["batches"] == 9


def test_state_mismatch_is_a_clear_error(tmp_path):
    paths, _ = write_shards(tmp_path / "d", 4, 3)
    state = make_loader(paths, num_workers=0).state_dict()
    with pytest.raises(ValueError, match=r"num_workers: saved 0, now 2"):
        make_loader(paths, num_workers=2).load_state_dict(state)
    state = make_loader(paths, dp_rank=0, dp_size=2).state_dict()
    with pytest.raises(ValueError, match=r"dp_size: saved 2, now 1"):
        make_loader(paths).load_state_dict(state)
    with pytest.raises(ValueError, match=r"num_shards: saved 4, now 3"):
        make_loader(paths[:3]).load_state_dict(make_loader(paths).state_dict())


# ---- bad samples -------------------------------------------------------------------------------------
def write_bad_shard(path):
    good = jpeg_bytes(5)
    with TarWriter(str(path), mtime=0) as writer:
        writer.write({"__key__": "good0", "jpg": good, "txt": b"fine"})
        writer.write({"__key__": "truncated", "jpg": good[: len(good) // 2], "txt": b"half an image"})
        writer.write({"__key__": "garbage", "png": b"\x89PNG not really", "txt": b"not an image"})
        writer.write({"__key__": "empty", "jpg": good, "txt": b"  \n"})
        writer.write({"__key__": "latin1", "jpg": good, "txt": "caf\xe9".encode("latin-1")})
        writer.write({"__key__": "nocaption", "jpg": good})
        writer.write({"__key__": "noimage", "txt": b"where is it"})
        writer.write({"__key__": "good1", "webp": _webp(), "txt": "café ☕".encode()})


def _webp():
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (10, 10), (1, 2, 3)).save(buffer, format="WEBP")
    return buffer.getvalue()


@pytest.mark.parametrize("num_workers", [0, 2])
def test_bad_samples_are_skipped_and_counted(tmp_path, num_workers):
    write_bad_shard(tmp_path / "a.tar")
    write_bad_shard(tmp_path / "b.tar")
    loader = make_loader([str(tmp_path / "a.tar"), str(tmp_path / "b.tar")], batch_size=1, epochs=1,
                         num_workers=num_workers)
    batches = list(loader)
    assert sorted(k for b in batches for k in b["keys"]) == ["good0", "good0", "good1", "good1"]
    assert loader.skipped == {"corrupt_image": 4, "empty_caption": 2, "non_utf8_text": 2, "missing_image": 2,
                              "missing_caption": 2, "corrupt_shard": 0, "failed_shard": 0, "missing_label": 0,
                              "bad_label": 0}
    assert loader.state_dict()["streams"][0]["skipped"]  # counts travel with the checkpoint


def test_truncated_tar_keeps_what_it_can_and_counts_the_shard(tmp_path):
    paths, keys = write_shards(tmp_path / "d", 2, 6)
    data = open(paths[1], "rb").read()
    with open(paths[1], "wb") as f:
        f.write(data[: len(data) // 2])
    loader = make_loader(paths, batch_size=1, epochs=1, shuffle=False)
    got = [k for b in loader for k in b["keys"]]
    assert got[:6] == keys[:6] and 0 < len(got) - 6 < 6
    assert loader.skipped["corrupt_shard"] == 1


def test_all_bad_shards_fail_loudly_instead_of_spinning(tmp_path):
    with TarWriter(str(tmp_path / "bad.tar"), mtime=0) as writer:
        writer.write({"__key__": "x", "jpg": b"nope", "txt": b"caption"})
    with pytest.raises(RuntimeError, match="no valid sample"):
        take(make_loader(str(tmp_path / "bad.tar")), 1)


def test_pipe_urls_are_read_through_webdataset(tmp_path):
    paths, keys = write_shards(tmp_path / "d", 2, 3)
    loader = make_loader([f"pipe:cat {p}" for p in paths], batch_size=2, shuffle=False, epochs=1)
    assert [k for b in loader for k in b["keys"]] == keys[:6]
    assert loader.samples_per_epoch() == 6


def test_resume_with_finite_epochs_and_uneven_workers(tmp_path):
    # uneven shards: one worker's stream ends before the other's; resume still continues exactly
    paths, _ = write_shards(tmp_path / "d", 4, [2, 9, 3, 7])

    def loader():
        return make_loader(paths, batch_size=2, num_workers=2, seed=5, epochs=2)

    reference = keys_of(list(loader()))
    for k in (len(reference) // 2, len(reference) - 3, len(reference) - 1):
        first = loader()
        head = keys_of(take(first, k))
        resumed = loader()
        resumed.load_state_dict(first.state_dict())
        assert head + keys_of(list(resumed)) == reference, f"resume after {k} batches"


# ---- remote shards: retries, skips, timeouts ---------------------------------------------------------------
FLAKY = """n=$(cat "$2" 2>/dev/null || echo 0); echo $((n + 1)) > "$2"
if [ "$n" -lt "$3" ]; then head -c "$4" "$1"; echo "flaky: connection reset" >&2; exit 1; fi
cat "$1"
"""


@pytest.mark.parametrize("num_workers", [0, 2])
def test_remote_shard_failing_twice_then_read_whole_gives_the_undisturbed_samples(tmp_path, num_workers):
    """A command that dies twice mid-shard (after some samples went out) and then succeeds: retried, the samples
    already given passed over, so the batches are exactly those of the local shards (shuffled alike)."""
    paths, _ = write_shards(tmp_path / "d", 4, 6)
    (tmp_path / "flaky.sh").write_text(FLAKY)
    flaky = [f"pipe:sh {tmp_path / 'flaky.sh'} {p} {tmp_path / f'count{i}'} 2 8000" for i, p in enumerate(paths)]
    reference = make_loader(paths, batch_size=2, seed=3, epochs=1, num_workers=num_workers)
    remote = make_loader(flaky, batch_size=2, seed=3, epochs=1, num_workers=num_workers, retry_delay=0)
    assert keys_of(list(remote)) == keys_of(list(reference))
    assert remote.shard_retries == 8 and remote.skipped["failed_shard"] == 0
    assert remote.state_dict()["streams"][0]["skipped"]["shard_retry"] > 0  # travels with the checkpoint


def test_remote_shard_failing_every_time_is_skipped_and_reported(tmp_path, caplog):
    """`pipe:false` and a refused connection: each tried 1 + shard_retries times, then skipped, counted and
    logged with its url; the good shard is read whole."""
    paths, keys = write_shards(tmp_path / "d", 1, 6)
    bad = ["pipe:false", "http://127.0.0.1:9/nothing.tar"]
    loader = make_loader([paths[0]] + bad, batch_size=2, shuffle=False, epochs=1, shard_retries=2, retry_delay=0)
    assert [k for b in loader for k in b["keys"]] == keys
    assert loader.skipped["failed_shard"] == 2 and loader.shard_retries == 4
    skipped = [r.getMessage() for r in caplog.records if "remote shard skipped" in r.getMessage()]
    assert len(skipped) == 2 and "pipe:false: failed 3 times" in skipped[0] and "status 1" in skipped[0]
    assert bad[1] in skipped[1]
    with pytest.raises(OSError, match="pipe:false: failed 3 times"):  # without on_error, the error is raised
        list(iter_samples("pipe:false", retries=2, retry_delay=0))


def test_a_stalled_remote_shard_times_out_instead_of_hanging(tmp_path):
    """A command that sends part of a shard then stalls: killed (with its children) after shard_timeout of
    silence, retried, then skipped; the samples before the stall are kept once."""
    import subprocess
    import time

    paths, keys = write_shards(tmp_path / "d", 2, 6)
    stall = f"pipe:sh -c 'head -c 8000 {paths[1]}; sleep 59.4321'"
    loader = make_loader([paths[0], stall], batch_size=1, shuffle=False, epochs=1, shard_timeout=0.5,
                         shard_retries=1, retry_delay=0)
    began = time.monotonic()
    got = [k for b in loader for k in b["keys"]]
    assert time.monotonic() - began < 10
    assert got[:6] == keys[:6] and 0 < len(got) - 6 < 6 and got[6:] == keys[6:len(got)]
    assert loader.skipped["failed_shard"] == 1 and loader.shard_retries == 1
    assert subprocess.run(["pgrep", "-f", "sleep 59.4321"], capture_output=True).returncode == 1  # none left
