"""Feature cache: exact round trip, damaged files refused, no half-written cache, one winner, S3."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from ltstudy.errors import DataError
from ltstudy.features.store import (
    SplitArrays,
    cache_exists,
    clear_process_cache,
    load_features,
    open_storage,
    read_manifest,
    write_cache,
)

from support.servers import free_port


def _splits(seed: int = 0, n: int = 37, d: int = 5, fmap=(3, 2, 2)) -> dict[str, SplitArrays]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for split, rows in (("train", n), ("val", 7), ("test", 9)):
        out[split] = SplitArrays(
            index=torch.randperm(1000, generator=g)[:rows], labels=torch.randint(0, 4, (rows,), generator=g),
            features=torch.randn(rows, d, generator=g),
            fmaps=torch.randn(rows, *fmap, generator=g) if split == "train" else None)
    return out


def test_round_trip_is_exact(tmp_path):
    st = open_storage(str(tmp_path))
    splits = _splits()
    assert write_cache(st, "k1", splits, head={"type": "linear", "w": torch.ones(2)})
    clear_process_cache()
    for split, arr in splits.items():
        got = load_features(str(tmp_path), "k1", split, "cpu", fmaps=split == "train")
        assert got[0].dtype == torch.float32 and torch.equal(got[0], arr.features)
        assert torch.equal(got[1], arr.labels) and torch.equal(got[2], arr.index)
        if split == "train":
            assert torch.equal(got[3], arr.fmaps)
    m = read_manifest(st, "k1", verify_files=True)
    assert m["rows"] == {"train": 37, "val": 7, "test": 9} and m["fmap_shape"] == [3, 2, 2]
    assert m["feature_dim"] == 5 and "feature: fixed_size_binary[20]" in m["schema"]["train"]
    assert not [p for p in os.listdir(tmp_path / "features") if p.startswith(".tmp")]


@pytest.mark.parametrize("damage", ["truncate", "flip_byte"])
def test_damaged_file_is_refused(tmp_path, damage):
    st = open_storage(str(tmp_path))
    write_cache(st, "k2", _splits())
    path = tmp_path / "features" / "k2" / "train.parquet"
    data = bytearray(path.read_bytes())
    if damage == "truncate":
        data = data[: len(data) // 2]
    else:
        data[len(data) // 3] ^= 0xFF
    path.write_bytes(bytes(data))
    clear_process_cache()
    with pytest.raises(DataError, match=r"k2/train.parquet is damaged .*ltstudy features extract"):
        load_features(str(tmp_path), "k2", "train")
    assert load_features(str(tmp_path), "k2", "val")[0].shape == (7, 5)  # other files still fine


def test_writer_without_manifest_leaves_nothing_readable(tmp_path):
    st = open_storage(str(tmp_path))
    # what a writer killed before its manifest leaves behind: a tmp dir of data files
    tmp = tmp_path / "features" / ".tmp-k3-dead"
    tmp.mkdir(parents=True)
    (tmp / "train.parquet").write_bytes(b"PAR1 partial")
    # and on an object store: data files under the final prefix, no manifest
    (tmp_path / "features" / "k3" / "data-x").mkdir(parents=True)
    assert not cache_exists(st, "k3")
    with pytest.raises(DataError, match="not found"):
        load_features(str(tmp_path), "k3", "train")


def test_killed_writer_process(tmp_path):
    """SIGKILL a process in the middle of writing: no cache appears."""
    script = textwrap.dedent(f"""
        import os, signal, torch
        import ltstudy.features.store as s
        real = s._write_bytes
        def write(fs, path, data):
            real(fs, path, data)
            if path.endswith("train.parquet"):
                os.kill(os.getpid(), signal.SIGKILL)
        s._write_bytes = write
        st = s.open_storage({str(tmp_path)!r})
        arr = s.SplitArrays(torch.arange(4), torch.zeros(4, dtype=torch.long), torch.randn(4, 3))
        s.write_cache(st, "k4", {{"train": arr, "val": arr, "test": arr}})
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True)
    assert proc.returncode == -9
    assert not cache_exists(open_storage(str(tmp_path)), "k4")
    assert not (tmp_path / "features" / "k4").exists()


def test_concurrent_writers_leave_one_cache(tmp_path):
    script = textwrap.dedent(f"""
        import sys, torch
        from ltstudy.features.store import SplitArrays, open_storage, write_cache
        n = 20000
        arr = SplitArrays(torch.arange(n), torch.zeros(n, dtype=torch.long), torch.randn(n, 64))
        won = write_cache(open_storage({str(tmp_path)!r}), "k5", {{"train": arr, "val": arr, "test": arr}})
        print("won" if won else "lost")
    """)
    procs = [subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [p.communicate()[0].strip() for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert sorted(os.listdir(tmp_path / "features")) == ["k5"]
    assert sorted(outs) == ["lost", "won"], outs  # exactly one writer commits
    read_manifest(open_storage(str(tmp_path)), "k5", verify_files=True)


@pytest.fixture
def s3_endpoint(monkeypatch):
    pytest.importorskip("moto")
    boto3 = pytest.importorskip("boto3")
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    for key, value in {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
                       "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(key, value)
    endpoint = f"http://127.0.0.1:{port}"
    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket="ltcache")
    yield endpoint
    server.stop()


def test_s3_round_trip_and_damage(s3_endpoint):
    import boto3

    st = open_storage("s3://ltcache/team/results", endpoint_override=s3_endpoint)
    splits = _splits(seed=3)
    assert write_cache(st, "k6", splits)
    clear_process_cache()
    f, y, i = load_features(st, "k6", "train")
    assert torch.equal(f, splits["train"].features) and torch.equal(y, splits["train"].labels)
    manifest = read_manifest(st, "k6", verify_files=True)
    s3 = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
    obj = f"team/results/features/k6/{manifest['files']['val']['path']}"
    body = bytearray(s3.get_object(Bucket="ltcache", Key=obj)["Body"].read())
    body[100] ^= 0xFF
    s3.put_object(Bucket="ltcache", Key=obj, Body=bytes(body))
    with pytest.raises(DataError, match="checksum mismatch"):
        load_features(st, "k6", "val")
    # the env-var endpoint works as well
    os.environ["AWS_ENDPOINT_URL"] = s3_endpoint
    try:
        assert cache_exists(open_storage("s3://ltcache/team/results"), "k6")
    finally:
        del os.environ["AWS_ENDPOINT_URL"]


def test_manifest_not_json_is_damaged(tmp_path):
    st = open_storage(str(tmp_path))
    write_cache(st, "k7", _splits())
    (Path(tmp_path) / "features" / "k7" / "manifest.json").write_text("{not json")
    with pytest.raises(DataError, match="k7/manifest.json is damaged"):
        read_manifest(st, "k7")
    json  # noqa: B018


def _object_store_like(root: Path):
    """The object-store commit protocol (manifest last, no rename) on a local folder."""
    import pyarrow.fs as pafs

    from ltstudy.features.store import Storage

    return Storage(pafs.LocalFileSystem(), str(root / "features"), str(root), atomic_rename=False)


def test_a_losing_object_store_writer_keeps_the_files_a_reader_may_be_fetching(tmp_path):
    """Writer A commits, a reader reads A's manifest, writer B replaces it: A's files stay readable, and the
    reader holding A's manifest loads them."""
    import ltstudy.features.store as store

    st = _object_store_like(tmp_path)
    assert write_cache(st, "k8", _splits(seed=1))
    stale = read_manifest(st, "k8")
    real = store._write_bytes

    def racing(fs, path, data):  # writer B's manifest lands right after A's
        real(fs, path, data)
        if path.endswith("manifest.json") and b'"token"' in bytes(data):
            foreign = json.loads(bytes(data))
            foreign["created_by"]["token"] = "someone-else"
            real(fs, path, json.dumps(foreign).encode())

    store._write_bytes = racing
    try:
        assert write_cache(st, "k8", _splits(seed=2)) is False, "A lost the race"
    finally:
        store._write_bytes = real
    clear_process_cache()
    for entry in stale["files"].values():  # the reader holding the first manifest still finds its files
        assert (tmp_path / "features" / "k8" / entry["path"]).is_file()
    table = store.read_split_table(st, "k8", "val", stale)
    assert table.num_rows == 7


def test_a_changed_manifest_is_a_lost_race_and_the_same_one_failing_is_damage(tmp_path, monkeypatch):
    import ltstudy.features.store as store

    st = _object_store_like(tmp_path)
    write_cache(st, "k9", _splits(seed=1))
    old = read_manifest(st, "k9")
    write_cache(st, "k9", _splits(seed=2))  # a second writer's set, manifest replaced
    (tmp_path / "features" / "k9" / old["files"]["train"]["path"]).unlink()  # the old set is gone
    real = store.read_manifest
    served = iter([old])
    monkeypatch.setattr(store, "read_manifest", lambda s, k, verify_files=False: next(served, None)
                        or real(s, k, verify_files))
    clear_process_cache()
    got = store.verified_manifest(st, "k9")  # A's files fail, the manifest changed: B's set is checked
    assert got["created_by"]["token"] != old["created_by"]["token"]
    monkeypatch.setattr(store, "read_manifest", real)
    (tmp_path / "features" / "k9" / got["files"]["test"]["path"]).write_bytes(b"PAR1")
    with pytest.raises(DataError, match="test.parquet is damaged"):
        store.verified_manifest(st, "k9")


@pytest.mark.parametrize("code", ["EACCES", "EEXIST"])
def test_a_failed_rename_is_an_error_unless_a_valid_cache_won(tmp_path, monkeypatch, code):
    import errno

    import ltstudy.features.store as store

    st = open_storage(str(tmp_path))
    if code == "EEXIST":  # a damaged directory sits where the cache would go
        (tmp_path / "features" / "k10").mkdir(parents=True)
        (tmp_path / "features" / "k10" / "manifest.json").write_text("{}")

    def refuse(src, dst):
        raise OSError(getattr(errno, code), os.strerror(getattr(errno, code)))

    monkeypatch.setattr(store.os, "rename", refuse)
    with pytest.raises(DataError, match="cannot commit feature cache k10"):
        write_cache(st, "k10", _splits())
    assert not [p for p in os.listdir(tmp_path / "features") if p.startswith(".tmp")]


def test_large_splits_load_as_one_chunk_without_a_copy_and_are_verified_once(tmp_path, monkeypatch):
    """Above 131,072 rows pyarrow's read_table returns several chunks (a concatenating copy); the cache reads
    one row group into one chunk that torch uses in place, and checks each file's sha256 once per process.
    Vectors are fixed-size binary rows: Parquet decodes a nested fixed_size_list<float> element by element
    (~100 MB/s), fixed-size binary cells at memory speed."""
    import ltstudy.features.store as store

    n = 140_000
    arr = SplitArrays(torch.arange(n), torch.zeros(n, dtype=torch.long), torch.randn(n, 4))
    st = open_storage(str(tmp_path))
    write_cache(st, "k11", {"train": arr, "val": arr, "test": arr})
    clear_process_cache()
    table = store.read_split_table(st, "k11", "train")
    column = table.column("feature")
    assert column.num_chunks == 1
    values = store._flat_numpy(column, n)
    assert values.ctypes.data == column.chunk(0).buffers()[1].address, "no copy into numpy"
    hashed = []
    real = store.hashlib.sha256
    monkeypatch.setattr(store.hashlib, "sha256", lambda data=b"": hashed.append(len(data)) or real(data))
    clear_process_cache()
    for _ in range(3):
        clear_process_cache(verified=False)
        f, _, _ = load_features(str(tmp_path), "k11", "train")
        assert torch.equal(f, arr.features)
    assert len(hashed) == 1, "verified once"
    os.utime(tmp_path / "features" / "k11" / "train.parquet", ns=(1, 1))  # the file changed: verify again
    clear_process_cache(verified=False)
    load_features(str(tmp_path), "k11", "train")
    assert len(hashed) == 2


def test_no_region_is_forced_on_s3(monkeypatch):
    import pyarrow.fs as pafs

    seen = {}
    monkeypatch.delenv("AWS_DEFAULT_REGION", raising=False)
    monkeypatch.setattr(pafs, "S3FileSystem", lambda **kw: seen.update(kw) or pafs.LocalFileSystem())
    open_storage("s3://bucket/prefix", endpoint_override="http://127.0.0.1:9")
    assert "region" not in seen and seen["endpoint_override"] == "127.0.0.1:9"
