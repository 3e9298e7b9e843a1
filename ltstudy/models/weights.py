"""Pretrained weights: which file a model name and ``pretrained=`` setting mean, the cache they are fetched
into, and their digest.

Every pretrained model loads its weights from one local file. ``pretrained=`` is either a local weights file
(``.safetensors`` or a checkpoint, in the library's own format: what its hub download gives) or a hub tag;
a tag may also be part of the model name (``timm:vit_base_patch16_224.augreg_in21k``,
``open_clip:ViT-B-16/openai``). A tag is fetched once, by :func:`fetch_weights` on the driver (``ltstudy
train``, ``tune``, ``features extract``), into a cache folder on the shared storage
(``<storage>/weights/<library>/<arch>/<tag>/``, written under a temporary name and renamed, with a
``manifest.json`` holding the file's size and sha256); trials then load that file and never reach a hub.
Without internet, a tag that is not in the cache is one line (``ConfigError``): pass the file instead.

The hub libraries are imported only when a tag is fetched: a ResNet run, ``ltstudy --help`` and every
local file never pay for them.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

from ltstudy.errors import ConfigError, DataError

PREFIXES = {"timm:": "timm", "open_clip:": "open_clip"}
#: the pip package of each library, for the missing-library line
PACKAGES = {"timm": "timm", "open_clip": "open_clip_torch", "peft": "peft", "safetensors": "safetensors"}
#: what ``pretrained=`` takes for "no weights": a random initialisation (tests, benchmarks)
RANDOM = ("none", "random")
WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt")
MANIFEST = "manifest.json"
DEFAULT_CACHE = os.path.join("ltstudy_results", "weights")


@dataclass(frozen=True)
class ModelName:
    """``timm:ARCH[.TAG]`` or ``open_clip:ARCH[/TAG]``."""

    library: str
    arch: str
    tag: str | None

    def __str__(self) -> str:
        sep = "." if self.library == "timm" else "/"
        return f"{self.library}:{self.arch}" + (f"{sep}{self.tag}" if self.tag else "")


def is_pretrained_name(name: str | None) -> bool:
    """Whether a model (or ``backbone=``) value names a timm or open_clip model."""
    return isinstance(name, str) and name.startswith(tuple(PREFIXES))


def parse_model_name(name: str) -> ModelName:
    """Split a ``timm:`` / ``open_clip:`` model name into library, architecture and hub tag."""
    prefix = next((p for p in PREFIXES if name.startswith(p)), None)
    if prefix is None:
        raise ConfigError(f"model {name!r} is not a timm:NAME or open_clip:ARCH/TAG model")
    library, rest = PREFIXES[prefix], name[len(prefix):].strip()
    sep = "." if library == "timm" else "/"
    arch, _, tag = rest.partition(sep)
    if not arch:
        raise ConfigError(f"model {name!r} names no architecture (timm:NAME or open_clip:ARCH/TAG)")
    return ModelName(library, arch, tag or None)


def require(library: str):
    """Import an optional library, or one line saying how to install it."""
    import importlib

    module = {"open_clip": "open_clip"}.get(library, library)
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ConfigError(f"{library} is not installed: pip install {PACKAGES.get(library, library)} "
                          "(or pip install 'ltstudy[pretrained]')") from None


def looks_like_file(value: str) -> bool:
    return os.sep in value or value.endswith(WEIGHT_SUFFIXES) or os.path.exists(value)


@dataclass(frozen=True)
class WeightsSource:
    """What a model's weights are: ``kind`` is ``"random"``, ``"file"`` (``path``) or ``"hub"`` (``tag``)."""

    kind: str
    path: str | None = None
    tag: str | None = None


def weights_source(name: str, pretrained: str | None) -> WeightsSource:
    """The weights a (model, ``pretrained``) pair asks for. ``pretrained`` unset: the tag in the name, else a
    random initialisation; ``none`` / ``random``: a random initialisation; a path: that file."""
    spec = parse_model_name(name)
    if pretrained is None:
        return WeightsSource("hub", tag=spec.tag) if spec.tag else WeightsSource("random")
    if pretrained.lower() in RANDOM:
        return WeightsSource("random")
    if looks_like_file(pretrained):
        path = Path(pretrained).expanduser()
        if not path.is_file():
            raise DataError(f"weights file {path} not found (pretrained= for {name})")
        return WeightsSource("file", path=str(path.resolve()))
    return WeightsSource("hub", tag=pretrained)


def cache_folder(cache: str | os.PathLike | None, spec: ModelName, tag: str) -> Path:
    root = Path(cache) if cache else Path(DEFAULT_CACHE)
    return root.expanduser().resolve() / spec.library / spec.arch.replace("/", "-") / tag


def cached_weights(cache: str | os.PathLike | None, name: str, tag: str) -> str | None:
    """The cached file of a hub tag when its manifest validates (size as recorded), else None."""
    folder = cache_folder(cache, parse_model_name(name), tag)
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
        path = folder / manifest["file"]
        if path.is_file() and path.stat().st_size == manifest["bytes"]:
            _DIGESTS[_stat_key(path)] = manifest["sha256"]
            return str(path)
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return None


# ------------------------------------------------------------------------------------------------ digest
_DIGESTS: dict[tuple, str] = {}


def _stat_key(path: Path) -> tuple:
    st = path.stat()
    return (str(path.resolve()), st.st_size, st.st_mtime_ns)


def weights_digest(path: str | os.PathLike) -> str:
    """sha256 of a weights file, computed once per process while its size and modification time stay."""
    p = Path(path)
    key = _stat_key(p)
    if key not in _DIGESTS:
        h = hashlib.sha256()
        with p.open("rb") as f:
            while block := f.read(1 << 22):
                h.update(block)
        _DIGESTS[key] = h.hexdigest()
    return _DIGESTS[key]


# ------------------------------------------------------------------------------------------------- fetch
def _offline_line(name: str, exc: BaseException, folder: Path) -> ConfigError:
    first = next((ln.strip() for ln in str(exc).splitlines() if ln.strip()), type(exc).__name__)
    return ConfigError(f"cannot fetch the weights of {name} (no internet or no such file on the hub: "
                       f"{type(exc).__name__}: {first[:160]}); download them where there is a connection and "
                       f"pass pretrained=FILE, or put them in {folder}")


def _download_timm(spec: ModelName, tag: str, into: Path) -> Path:
    timm = require("timm")
    try:
        cfg = timm.models.get_pretrained_cfg(f"{spec.arch}.{tag}", allow_unregistered=False)
    except RuntimeError:  # timm raises for a tag it does not know
        cfg = None
    if cfg is None:
        tags = [n.split(".", 1)[1] for n in timm.list_pretrained(f"{spec.arch}.*") if "." in n]
        raise ConfigError(f"timm has no pretrained tag {tag!r} for {spec.arch}; tags: {', '.join(tags) or 'none'}")
    if cfg.hf_hub_id:
        from huggingface_hub import hf_hub_download

        last: BaseException | None = None
        for filename in ("model.safetensors", "pytorch_model.bin"):
            try:
                return Path(hf_hub_download(cfg.hf_hub_id, filename, local_dir=str(into)))
            except Exception as exc:  # noqa: BLE001 - not on the hub, or no connection: try the next name
                last = exc
        assert last is not None
        raise last
    if cfg.url:
        import torch.hub

        target = into / os.path.basename(cfg.url.split("?")[0])
        torch.hub.download_url_to_file(cfg.url, str(target), progress=False)
        return target
    raise ConfigError(f"timm's {spec.arch}.{tag} names no file to download")


def _download_open_clip(spec: ModelName, tag: str, into: Path) -> Path:
    open_clip = require("open_clip")
    cfg = open_clip.get_pretrained_cfg(spec.arch, tag)
    if not cfg:
        tags = open_clip.list_pretrained_tags_by_model(spec.arch)
        raise ConfigError(f"open_clip has no pretrained tag {tag!r} for {spec.arch}; tags: {', '.join(tags) or 'none'}")
    return Path(open_clip.download_pretrained(cfg, cache_dir=str(into)))


def fetch_weights(name: str, pretrained: str | None, cache: str | os.PathLike | None = None) -> str | None:
    """The local file of a model's weights, downloading a hub tag into ``cache`` first when it is not there
    (on the driver only: trials call :func:`local_weights`). None for a random initialisation."""
    src = weights_source(name, pretrained)
    if src.kind != "hub":
        return src.path
    hit = cached_weights(cache, name, src.tag)
    if hit is not None:
        return hit
    spec = parse_model_name(name)
    folder = cache_folder(cache, spec, src.tag)
    created = next((p for p in reversed([folder.parent, *folder.parent.parents]) if not p.exists()), None)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.parent / f".tmp-{src.tag}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    fetched = False
    try:
        try:
            got = (_download_timm if spec.library == "timm" else _download_open_clip)(spec, src.tag, tmp)
        except ConfigError:
            raise
        except Exception as exc:  # noqa: BLE001 - any hub failure (offline, 404, proxy) is one line
            raise _offline_line(str(spec), exc, folder) from None
        real = Path(os.path.realpath(got))
        final_name = real.name if real.suffix in WEIGHT_SUFFIXES else got.name
        staged = tmp / ("weights-" + final_name)
        shutil.copyfile(real, staged)
        manifest = {"file": final_name, "bytes": staged.stat().st_size, "sha256": weights_digest(staged),
                    "model": str(spec), "tag": src.tag}
        out = tmp / "out"
        out.mkdir()
        os.replace(staged, out / final_name)
        (out / MANIFEST).write_text(json.dumps(manifest, indent=1))
        try:
            os.rename(out, folder)  # atomic; refuses a non-empty target: another driver fetched it first
        except OSError:
            if cached_weights(cache, name, src.tag) is None:
                raise DataError(f"cannot store the weights of {spec} in {folder} (a damaged cache is in the way; "
                                "remove it)") from None
        fetched = True
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if not fetched and created is not None:  # a failed fetch leaves no empty folders behind
            with contextlib.suppress(OSError):
                for p in [folder.parent, *folder.parent.parents]:
                    p.rmdir()
                    if p == created:
                        break
    hit = cached_weights(cache, name, src.tag)
    assert hit is not None
    return hit


def local_weights(name: str, pretrained: str | None, cache: str | os.PathLike | None = None) -> str | None:
    """The local file a trial loads (None: random initialisation); a hub tag must already be in the cache."""
    src = weights_source(name, pretrained)
    if src.kind != "hub":
        return src.path
    hit = cached_weights(cache, name, src.tag)
    if hit is None:
        folder = cache_folder(cache, parse_model_name(name), src.tag)
        raise ConfigError(f"the weights of {parse_model_name(name).library}:{parse_model_name(name).arch} "
                          f"({src.tag}) are not in the cache {folder}: the driver fetches them before trials "
                          "start (ltstudy train / tune / features extract), or pass pretrained=FILE")
    return hit
