"""`megacoca data stats`' numbers: samples counted from tar headers as webdataset groups them, and the epoch costs
of a mixture, on small hand-built sets."""

import os
import tarfile

import pytest

from megacoca.data.stats import count_samples, mixture_epochs, source_size

from .conftest import write_shards


def test_count_samples_groups_files_by_key_like_webdataset(tmp_path):
    paths, _ = write_shards(tmp_path / "a", 2, [3, 4])
    assert [count_samples(path) for path in paths] == [3, 4]
    path = tmp_path / "odd.tar"
    with tarfile.open(path, "w") as tar:
        for name in ("dir/one.jpg", "dir/one.txt", "__meta__", "two.jpg", "two.seg.png", "noext", "three.cls"):
            source = tmp_path / "payload"
            source.write_bytes(b"x")
            tar.add(source, arcname=name)
        info = tarfile.TarInfo("four")  # a directory entry: no sample
        info.type = tarfile.DIRTYPE
        tar.addfile(info)
    assert count_samples(str(path)) == 3  # dir/one, two, three
    assert source_size("a", str(tmp_path / "a"), 2.0).per_shard == [3, 4]


def test_mixture_epochs_by_hand():
    """a: 100 samples, weight 1 (share 1/4); b: 600 samples, weight 3 (share 3/4). One epoch of a costs 400 mixture
    samples, in which b reads 300 = 1/2 epoch; one epoch of b costs 800, in which a reads 200 = 2 epochs."""
    from megacoca.data.stats import SourceSize

    a, b = SourceSize("a", 1.0, ["x"], [60, 40]), SourceSize("b", 3.0, ["y", "z", "w"], [200, 200, 200])
    rows = mixture_epochs([a, b])
    assert [row.name for row in rows] == ["a", "b"]
    assert rows[0].share == pytest.approx(0.25) and rows[1].share == pytest.approx(0.75)
    assert rows[0].mixture_samples == pytest.approx(400) and rows[1].mixture_samples == pytest.approx(800)
    assert rows[0].epochs == pytest.approx({"a": 1.0, "b": 0.5})
    assert rows[1].epochs == pytest.approx({"a": 2.0, "b": 1.0})
    with pytest.raises(ValueError, match="source 'e' has no samples in its 1 shards"):
        mixture_epochs([a, SourceSize("e", 1.0, ["v"], [0])])


def test_a_damaged_shard_is_an_error(tmp_path):
    path = os.path.join(tmp_path, "bad.tar")
    with open(path, "wb") as handle:
        handle.write(b"not a tar at all" * 64)
    with pytest.raises(tarfile.TarError):
        count_samples(path)
