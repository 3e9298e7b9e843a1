"""The feature cache: backbone features in Parquet on any ``pyarrow.fs`` storage.

:mod:`ltstudy.features.store` holds the content-addressed store (atomic commit, validated reads,
zero-copy loading); :mod:`ltstudy.features.extract` runs a backbone checkpoint over the three splits.
"""

from ltstudy.features.extract import extract_features
from ltstudy.features.store import (
    DEFAULT_STORAGE,
    Storage,
    cache_exists,
    clear_process_cache,
    load_features,
    load_split,
    open_storage,
    read_head,
    read_manifest,
)

__all__ = [
    "DEFAULT_STORAGE",
    "Storage",
    "cache_exists",
    "clear_process_cache",
    "extract_features",
    "load_features",
    "load_split",
    "open_storage",
    "read_head",
    "read_manifest",
]

