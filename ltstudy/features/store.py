"""The feature cache store: content-addressed Parquet files on any ``pyarrow.fs`` filesystem.

Layout under a root URI (a local path, an NFS mount, or ``s3://bucket/prefix``)::

    <root>/features/<key>/manifest.json       written last; a cache exists only when it validates
    <root>/features/<key>/train.parquet        index int64, label int64, view int16,
                                               feature fixed_size_binary[4*D] (float32 rows)
                                               [, fmap fixed_size_binary[4*C*H*W]]
    <root>/features/<key>/val.parquet, test.parquet
    <root>/features/<key>/head.pt              the backbone's classifier (state dict + type)

``key`` is the sha256 of the content that determines the features (:func:`cache_key`): the checkpoint
file's sha256, the dataset definition, the extractor version and the extraction options. One key holds
the three splits (one file each) under one manifest, so the splits are committed together.

Commit protocol.

* Local paths and NFS: every file is written to ``<root>/features/.tmp-<key>-<uuid>/``, the manifest
  last, and the directory is then renamed to ``<key>``. ``rename`` is atomic and refuses a non-empty
  target, which gives rename-if-absent semantics: when two processes extract the same key, the second
  rename fails and that process discards its own copy, so exactly one cache directory remains.
  A rename that fails for any other reason (permissions, a full disk, a damaged cache in the way) is an
  error, not a lost race.
* Object stores (S3 and friends, where a "directory rename" is a copy): the data files are written under
  ``<key>/data-<uuid>/`` and ``<key>/manifest.json`` is written LAST, naming those files. A reader only
  trusts a manifest that validates (every file present with the recorded size and sha256), so a killed
  writer leaves nothing readable, and two concurrent writers each publish a complete, self-consistent
  set: the last manifest written wins. The loser never deletes its data prefix (a reader may have read
  its manifest a moment before and be fetching those files); an unreferenced ``data-<uuid>/`` stays until
  the cache is rebuilt (``ltstudy features extract --force`` removes the whole key).

Reading. A verification that fails is told apart from a lost race (:func:`verified_manifest`): when the
manifest changed meanwhile, the new one is checked; only a manifest whose own files fail is damage,
:class:`~ltstudy.errors.DataError` naming the file. Local files are memory-mapped and their sha256 is
checked once per process (per path, size and modification time); Parquet decodes each column into one
Arrow buffer (the files hold one row group), which torch then uses without a copy. Object-store files are
fetched whole, and checked on every fetch.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import posixpath
import socket
import time
import uuid
import warnings
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlparse

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import torch

from ltstudy.errors import ConfigError, DataError

#: bump when the extraction changes in a way that changes the stored features
EXTRACTOR_VERSION = 2
#: 2: vectors as fixed_size_binary rows of little-endian float32 (Parquet decodes nested fixed_size_list
#: columns element by element, at ~100 MB/s; fixed-size binary at memory speed)
FORMAT = "ltstudy-feature-cache/2"
#: how a vector row is laid out in its fixed_size_binary cell
ROW_DTYPE = np.dtype("<f4")
SPLITS = ("train", "val", "test")
DEFAULT_STORAGE = "./ltstudy_results"
MANIFEST = "manifest.json"
HEAD_FILE = "head.pt"
REBUILD_HINT = "run `ltstudy features extract` to rebuild it"


# --------------------------------------------------------------------------------------------------
# filesystems


@dataclass(frozen=True)
class Storage:
    """A resolved cache root: a pyarrow filesystem and the base path of ``features/`` on it."""

    fs: pafs.FileSystem
    base: str  # path of <root>/features on ``fs``
    uri: str
    atomic_rename: bool  # local/NFS: commit by rename; object stores: manifest last

    def path(self, *parts: str) -> str:
        return posixpath.join(self.base, *parts)


def open_storage(uri: str | None = None, endpoint_override: str | None = None) -> Storage:
    """Resolve a root URI. ``s3://bucket/prefix`` honours ``endpoint_override`` or ``AWS_ENDPOINT_URL``."""
    uri = uri or DEFAULT_STORAGE
    parsed = urlparse(uri)
    if parsed.scheme == "s3":
        endpoint = endpoint_override or os.environ.get("AWS_ENDPOINT_URL")
        kw: dict[str, Any] = {}  # the region comes from the usual AWS settings (env, ~/.aws/config)
        if endpoint:
            ep = urlparse(endpoint if "://" in endpoint else f"https://{endpoint}")
            kw.update(endpoint_override=ep.netloc, scheme=ep.scheme or "https")
        fs = pafs.S3FileSystem(**kw)
        base = posixpath.join(parsed.netloc + parsed.path.rstrip("/"), "features")
        return Storage(fs, base, uri, atomic_rename=False)
    if parsed.scheme in ("", "file"):
        local = parsed.path if parsed.scheme == "file" else uri
        base = os.path.join(os.path.abspath(os.path.expanduser(local)), "features")
        return Storage(pafs.LocalFileSystem(), base, uri, atomic_rename=True)
    try:
        fs, path = pafs.FileSystem.from_uri(uri)
    except (pa.ArrowInvalid, OSError) as exc:
        raise ConfigError(f"cannot open feature storage {uri!r}: {exc}") from None
    return Storage(fs, posixpath.join(path.rstrip("/"), "features"), uri, atomic_rename=False)


def _exists(fs: pafs.FileSystem, path: str) -> bool:
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def _write_bytes(fs: pafs.FileSystem, path: str, data: bytes | pa.Buffer) -> None:
    with fs.open_output_stream(path) as out:
        out.write(data)


def _read_bytes(fs: pafs.FileSystem, path: str) -> pa.Buffer:
    with fs.open_input_stream(path) as src:
        return src.read_buffer()


def _delete_dir(fs: pafs.FileSystem, path: str) -> None:
    try:
        fs.delete_dir(path)
    except (FileNotFoundError, OSError):
        pass


# --------------------------------------------------------------------------------------------------
# keys


def file_sha256(path: str, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def cache_key(fields: dict[str, Any]) -> str:
    """sha256 of the canonical JSON of everything that determines the features."""
    blob = json.dumps({"extractor_version": EXTRACTOR_VERSION, **fields}, sort_keys=True,
                      separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


# --------------------------------------------------------------------------------------------------
# Arrow tables


def _fixed_rows(values: np.ndarray, width: int) -> pa.FixedSizeBinaryArray:
    """(N, width) float32 as N fixed-size binary cells of 4·width bytes, built on the array's own buffer."""
    flat = np.ascontiguousarray(values, dtype=ROW_DTYPE).reshape(-1)
    n = flat.size // width if width else 0
    return pa.FixedSizeBinaryArray.from_buffers(pa.binary(ROW_DTYPE.itemsize * width), n,
                                                [None, pa.py_buffer(flat)])


def make_table(index: torch.Tensor, labels: torch.Tensor, features: torch.Tensor,
               fmaps: torch.Tensor | None = None, views: torch.Tensor | None = None) -> pa.Table:
    """The Arrow table of one split (tensors on any device; copied to host once)."""
    n = len(labels)
    cols = {
        "index": pa.array(index.detach().cpu().numpy().astype(np.int64)),
        "label": pa.array(labels.detach().cpu().numpy().astype(np.int64)),
        "view": pa.array((views.detach().cpu().numpy() if views is not None
                          else np.zeros(n)).astype(np.int16)),
        "feature": _fixed_rows(features.detach().float().cpu().numpy(), int(features.shape[1])),
    }
    if fmaps is not None:
        cols["fmap"] = _fixed_rows(fmaps.detach().float().cpu().numpy(), int(np.prod(fmaps.shape[1:])))
    return pa.table(cols)


def _table_bytes(table: pa.Table) -> pa.Buffer:
    sink = pa.BufferOutputStream()
    # one row group, no dictionary, no compression: float features barely compress, and a single
    # chunk lets the reader hand the rows' buffer to torch without a copy
    pq.write_table(table, sink, row_group_size=max(table.num_rows, 1), use_dictionary=False,
                   compression="none")
    return sink.getvalue()


def _chunk_rows(arr: pa.FixedSizeBinaryArray) -> np.ndarray:
    width = arr.type.byte_width // ROW_DTYPE.itemsize
    buf = arr.buffers()[1]
    return np.frombuffer(buf, dtype=ROW_DTYPE, count=len(arr) * width,
                         offset=arr.offset * arr.type.byte_width).reshape(len(arr), width)


def _flat_numpy(column: pa.ChunkedArray, n: int) -> np.ndarray:
    """The (n, width) float32 view of a fixed_size_binary vector column: the Arrow buffer itself when it is one
    chunk (always, for files written here: one row group, read with ``ParquetFile.read``)."""
    if column.num_chunks == 1:
        return _chunk_rows(column.chunk(0))
    width = column.type.byte_width // ROW_DTYPE.itemsize
    if column.num_chunks == 0:
        return np.zeros((0, width), dtype=ROW_DTYPE)
    return np.concatenate([_chunk_rows(c) for c in column.chunks])  # several chunks: one copy


# --------------------------------------------------------------------------------------------------
# writing


@dataclass
class SplitArrays:
    """What one split contributes to the cache."""

    index: torch.Tensor
    labels: torch.Tensor
    features: torch.Tensor
    fmaps: torch.Tensor | None = None  # (N, C, H, W)
    views: torch.Tensor | None = None  # 0 = eval transform, 1..V = augmented passes


def _manifest_ok(storage: Storage, key: str) -> bool:
    try:
        read_manifest(storage, key, verify_files=True)
        return True
    except DataError:
        return False


def _write_files(storage: Storage, workdir: str, prefix: str, splits: dict[str, SplitArrays],
                 head: dict[str, Any] | None) -> dict[str, Any]:
    """Write the splits' Parquet files (and the head) under ``workdir``; the manifest entries describing them."""
    out: dict[str, Any] = {"rows": {}, "schema": {}, "files": {}, "head": None, "feature_dim": None,
                           "fmap_shape": None}

    def put(name: str, data: bytes | pa.Buffer) -> dict[str, Any]:
        rel = posixpath.join(prefix, name) if prefix else name
        _write_bytes(storage.fs, posixpath.join(workdir, rel), data)
        return {"path": rel, "bytes": len(data) if isinstance(data, bytes) else data.size,
                "sha256": hashlib.sha256(data).hexdigest()}

    for split, arr in splits.items():
        table = make_table(arr.index, arr.labels, arr.features, arr.fmaps, arr.views)
        out["files"][split] = put(f"{split}.parquet", _table_bytes(table))
        out["schema"][split] = table.schema.to_string(show_schema_metadata=False)
        out["rows"][split] = table.num_rows
        out["feature_dim"] = int(arr.features.shape[1])
        if arr.fmaps is not None:
            out["fmap_shape"] = list(arr.fmaps.shape[1:])
    if head is not None:
        bio = io.BytesIO()
        torch.save({k: (v.detach().cpu() if torch.is_tensor(v) else v) for k, v in head.items()}, bio)
        out["head"] = put(HEAD_FILE, bio.getvalue())
    return out


def write_cache(storage: Storage, key: str, splits: dict[str, SplitArrays], *,
                head: dict[str, Any] | None = None, info: dict[str, Any] | None = None) -> bool:
    """Write a complete cache for ``key``. Returns False when another writer committed first."""
    token = uuid.uuid4().hex[:12]
    if storage.atomic_rename:
        workdir, prefix = storage.path(f".tmp-{key}-{token}"), ""
    else:
        workdir, prefix = storage.path(key), f"data-{token}"
    storage.fs.create_dir(posixpath.join(workdir, prefix) if prefix else workdir, recursive=True)
    manifest = {
        "format": FORMAT, "key": key, "extractor_version": EXTRACTOR_VERSION,
        **_write_files(storage, workdir, prefix, splits, head),
        "created_by": {"host": socket.gethostname(), "pid": os.getpid(),
                       "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "token": token},
        **(info or {}),
    }
    _write_bytes(storage.fs, posixpath.join(workdir, MANIFEST),
                 json.dumps(manifest, indent=1, sort_keys=True).encode())
    if storage.atomic_rename:
        return _commit_by_rename(storage, key, workdir)
    # object store: manifest-last; a concurrent writer's manifest may have replaced ours. Our files stay:
    # a reader may have read our manifest just before and be fetching them.
    try:
        current = json.loads(_read_bytes(storage.fs, storage.path(key, MANIFEST)).to_pybytes())
    except (OSError, ValueError):
        current = {}
    return current.get("created_by", {}).get("token") == token


def _commit_by_rename(storage: Storage, key: str, workdir: str) -> bool:
    """Local / NFS: the finished folder renamed into place; False when another writer committed first."""
    final = storage.path(key)
    try:
        os.rename(workdir, final) if isinstance(storage.fs, pafs.LocalFileSystem) \
            else storage.fs.move(workdir, final)
    except OSError as exc:
        _delete_dir(storage.fs, workdir)  # never visible to a reader
        taken = exc.errno in (errno.EEXIST, errno.ENOTEMPTY) or _exists(storage.fs, final)
        if taken and _manifest_ok(storage, key):
            return False  # rename refuses a non-empty target: another writer committed first
        why = "a damaged cache is in the way" if taken else exc.strerror or str(exc)
        raise DataError(f"cannot commit feature cache {key} to {final}: {why}; {REBUILD_HINT}") from None
    return True


def remove_cache(storage: Storage, key: str) -> None:
    """Delete a (damaged) cache: the manifest first, so no reader trusts half-deleted files."""
    try:
        storage.fs.delete_file(storage.path(key, MANIFEST))
    except (FileNotFoundError, OSError):
        pass
    _delete_dir(storage.fs, storage.path(key))


# --------------------------------------------------------------------------------------------------
# reading


def _damaged(key: str, rel: str, why: str) -> DataError:
    return DataError(f"feature cache {key}/{rel} is damaged ({why}); {REBUILD_HINT}")


def cache_exists(storage: Storage, key: str) -> bool:
    return _exists(storage.fs, storage.path(key, MANIFEST))


def read_manifest(storage: Storage, key: str, verify_files: bool = False) -> dict[str, Any]:
    """The parsed manifest; with ``verify_files`` every file's size and sha256 are checked
    (:func:`verified_manifest`, which tells damage from a concurrent writer)."""
    if verify_files:
        return verified_manifest(storage, key)
    path = storage.path(key, MANIFEST)
    if not _exists(storage.fs, path):
        raise DataError(f"feature cache {key} not found under {storage.uri} (no {MANIFEST}); "
                        "run `ltstudy features extract` to build it")
    try:
        manifest = json.loads(_read_bytes(storage.fs, path).to_pybytes())
    except (ValueError, UnicodeDecodeError):
        raise _damaged(key, MANIFEST, "not valid JSON") from None
    except OSError:  # removed between the check and the read
        raise DataError(f"feature cache {key} not found under {storage.uri} (no {MANIFEST})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or manifest.get("key") != key:
        raise _damaged(key, MANIFEST, "unknown format or wrong key")
    return manifest


def _token(manifest: dict[str, Any]) -> str | None:
    return manifest.get("created_by", {}).get("token")


def verified_manifest(storage: Storage, key: str, attempts: int = 3) -> dict[str, Any]:
    """The manifest, every file it names verified; damage only when the same manifest's files fail.

    On an object store a concurrent writer may replace the manifest while this one's files are read: when
    a check fails and the manifest has changed since, the new manifest is checked instead (a lost race, not
    damage). The manifest that fails twice, or on the last attempt, raises the file's ``DataError``.
    """
    failure: DataError | None = None
    for _ in range(attempts):
        manifest = read_manifest(storage, key)
        try:
            for entry in [*manifest["files"].values(), *([manifest["head"]] if manifest["head"] else [])]:
                _verified_source(storage, key, entry)
            return manifest
        except DataError as exc:
            failure = exc
            if _token(read_manifest(storage, key)) == _token(manifest):
                raise
    assert failure is not None
    raise failure


#: (path, size, mtime_ns, sha256) of the local files this process has verified
_VERIFIED: set[tuple[Any, ...]] = set()


def _verified_source(storage: Storage, key: str, entry: dict[str, Any]) -> pa.Buffer:
    """The file's bytes, checked against the manifest entry: a memory map of a local file (checked once per
    process while its size and modification time stay), the fetched bytes of an object (checked each time)."""
    rel = entry["path"]
    path = storage.path(key, rel)
    if isinstance(storage.fs, pafs.LocalFileSystem):
        try:
            stat = os.stat(path)
        except FileNotFoundError:
            raise _damaged(key, rel, "file missing") from None
        if stat.st_size != entry["bytes"]:
            raise _damaged(key, rel, f"size {stat.st_size} bytes, manifest says {entry['bytes']}")
        tag: tuple[Any, ...] = (path, stat.st_size, stat.st_mtime_ns, entry["sha256"])
        # a view of the map (the buffer keeps it alive); pages are read from disk as they are touched
        buf = pa.memory_map(path).read_buffer(stat.st_size)
    else:
        if not _exists(storage.fs, path):
            raise _damaged(key, rel, "file missing")
        buf = _read_bytes(storage.fs, path)
        if buf.size != entry["bytes"]:
            raise _damaged(key, rel, f"size {buf.size} bytes, manifest says {entry['bytes']}")
        tag = ()  # fetched whole each time, so checked each time: an object can change in place
    if tag not in _VERIFIED:
        if hashlib.sha256(buf).hexdigest() != entry["sha256"]:
            raise _damaged(key, rel, "checksum mismatch")
        if tag:
            _VERIFIED.add(tag)
    return buf


def read_split_table(storage: Storage, key: str, split: str,
                     manifest: dict[str, Any] | None = None) -> pa.Table:
    """Read and verify one split's Parquet file: one Arrow chunk per column, whatever the row count."""
    manifest = manifest or read_manifest(storage, key)
    if split not in manifest["files"]:
        raise DataError(f"feature cache {key} has no split {split!r}; it holds "
                        f"{', '.join(manifest['files'])}")
    entry = manifest["files"][split]
    buf = _verified_source(storage, key, entry)
    try:
        # ParquetFile.read decodes a row group into one chunk (read_table's scanner cuts 131,072-row batches);
        # one thread: the decode is a copy per column, and a thread pool only makes the copies contend
        table = pq.ParquetFile(pa.BufferReader(buf)).read(use_threads=False)
    except (pa.ArrowInvalid, OSError) as exc:
        raise _damaged(key, entry["path"], f"unreadable Parquet: {exc}") from None
    if table.num_rows != manifest["rows"][split]:
        raise _damaged(key, entry["path"], f"{table.num_rows} rows, manifest says "
                                           f"{manifest['rows'][split]}")
    return table


def read_head(storage: Storage, key: str, manifest: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """The backbone classifier stored beside the features: {"type", "state_dict", ...} or None."""
    manifest = manifest or read_manifest(storage, key)
    if not manifest.get("head"):
        return None
    buf = _verified_source(storage, key, manifest["head"])
    return torch.load(io.BytesIO(buf.to_pybytes()), map_location="cpu", weights_only=True)


@dataclass
class SplitTensors:
    features: torch.Tensor
    labels: torch.Tensor
    index: torch.Tensor
    views: torch.Tensor
    fmaps: torch.Tensor | None


_PROCESS_CACHE: dict[tuple[str, str, str, str], SplitTensors] = {}


def clear_process_cache(verified: bool = True) -> None:
    """Forget the splits loaded in this process, and (``verified``) which files were already verified."""
    _PROCESS_CACHE.clear()
    if verified:
        _VERIFIED.clear()


def _to_tensor(values: np.ndarray) -> torch.Tensor:
    with warnings.catch_warnings():  # Arrow buffers are read-only; ltstudy never writes into them
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(values)


def load_split(storage: Storage, key: str, split: str, device: torch.device | str = "cpu",
               fmaps: bool = False) -> SplitTensors:
    """One split as tensors on ``device``; cached per process by (root, key, split, device)."""
    device = torch.device(device)
    tag = (storage.base, key, split, f"{device}|{int(fmaps)}")
    hit = _PROCESS_CACHE.get(tag)
    if hit is not None:
        return hit
    manifest = read_manifest(storage, key)
    table = read_split_table(storage, key, split, manifest)
    n = table.num_rows
    feats = _to_tensor(_flat_numpy(table.column("feature"), n))
    maps = None
    if fmaps:
        if "fmap" not in table.column_names or not manifest.get("fmap_shape"):
            raise DataError(f"feature cache {key}/{split} holds no feature maps; extract with --fmaps")
        maps = _to_tensor(_flat_numpy(table.column("fmap"), n)).view(n, *manifest["fmap_shape"])
    out = SplitTensors(
        features=feats.to(device),
        labels=_to_tensor(table.column("label").to_numpy()).to(device),
        index=_to_tensor(table.column("index").to_numpy()).to(device),
        views=_to_tensor(table.column("view").to_numpy()).to(device),
        fmaps=maps.to(device) if maps is not None else None,
    )
    _PROCESS_CACHE[tag] = out
    return out


def load_features(root: str | Storage | None, key: str, split: str, device: torch.device | str = "cpu",
                  *, fmaps: bool = False, view: int | None = 0, endpoint_override: str | None = None
                  ) -> tuple[torch.Tensor, ...]:
    """``(features (N, D) float32, labels, index[, fmaps (N, C, H, W)])`` of one split on ``device``.

    ``view`` selects the eval-transform rows (0, the default), one augmented pass (1..V), or every
    row (None). On the CPU the tensors share memory with the Arrow buffers: treat them as read-only.
    """
    storage = root if isinstance(root, Storage) else open_storage(root, endpoint_override)
    s = load_split(storage, key, split, device, fmaps)
    if view is None:
        parts = (s.features, s.labels, s.index) + ((s.fmaps,) if fmaps else ())
        return parts
    rows = s.views == view
    if bool(rows.all()):
        return (s.features, s.labels, s.index) + ((s.fmaps,) if fmaps else ())
    sel = rows.nonzero().flatten()
    out = (s.features[sel], s.labels[sel], s.index[sel])
    return out + ((s.fmaps[sel],) if fmaps and s.fmaps is not None else ())
