"""Where the Optuna studies live: a journal file beside the results, or an RDB (PostgreSQL, MySQL, SQLite).

One storage holds every study of a storage root (``optuna-dashboard <root>/optuna.journal`` shows them all).
An object store cannot hold Optuna's journal, and the driver's home folder would not survive ``ray down``,
so a study on ``s3://`` storage must name one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import optuna
import sqlalchemy
from optuna.storages.journal import JournalFileBackend

from ltstudy.errors import ConfigError
from ltstudy.study.storage import public_url, redact_url

__all__ = ["OPTUNA_JOURNAL", "open_optuna_storage", "optuna_location", "public_url", "redact_url"]

#: the Optuna journal of every study under a local storage root
OPTUNA_JOURNAL = "optuna.journal"


#: public URL -> the URL with its password, for the storages this process opened (see PrivateRDBStorage)
_GIVEN_URLS: dict[str, str] = {}


class PrivateRDBStorage(optuna.storages.RDBStorage):
    """An RDB storage that pickles without its password: Tune pickles the searcher (and with it the
    storage) into ``tuner.pkl`` and ``searcher-state-*.pkl`` beside the results. Unpickled, it takes the
    password from the URL this process was given again (``--resume --optuna-storage URL``), else the
    database client's password file (``~/.pgpass``)."""

    def __getstate__(self) -> dict[Any, Any]:
        state = super().__getstate__()
        state["url"] = public_url(state["url"])
        return state

    def __setstate__(self, state: dict[Any, Any]) -> None:
        state = dict(state)
        state["url"] = _GIVEN_URLS.get(state["url"], state["url"])
        super().__setstate__(state)


def open_optuna_storage(location: str):
    """The Optuna storage that holds every study: a journal file path, or an RDB URL (``sqlite:///…``,
    ``postgresql://…``)."""
    if "://" in location:
        _GIVEN_URLS[public_url(location)] = location
        return PrivateRDBStorage(location)
    return optuna.storages.JournalStorage(JournalFileBackend(location))


def optuna_location(given: str | None, storage: str, remote_storage: bool) -> str:
    """Where every study's Optuna study lives: ``--optuna-storage`` (a journal file on a shared folder or an
    RDB URL), else the journal beside the results of a local ``--storage``."""
    if given:
        if "://" not in given:
            path = Path(given).expanduser().resolve()
            if path.is_dir():
                path = path / OPTUNA_JOURNAL
            if not path.parent.is_dir():
                raise ConfigError(f"--optuna-storage {given}: folder {path.parent} does not exist")
            return str(path)
        if not given.startswith(("sqlite:///", "postgresql", "mysql")):
            raise ConfigError(f"--optuna-storage {redact_url(given)!r}: use a journal file path or an RDB URL "
                              "(postgresql://…, mysql://…, sqlite:///…)")
        _check_rdb(given)
        return given
    if remote_storage:
        raise ConfigError(f"--storage {storage} is an object store, which cannot hold the Optuna study: pass "
                          "--optuna-storage (an RDB URL such as postgresql://… or a journal file on a "
                          "folder that outlives the cluster)")
    return str(Path(storage) / OPTUNA_JOURNAL)


def _check_rdb(url: str) -> None:
    """Connect once (no tables written) so a wrong host or password is one line before anything starts."""
    if url.startswith("sqlite:///"):
        folder = Path(url[len("sqlite:///"):]).expanduser().resolve().parent
        if not folder.is_dir():
            raise ConfigError(f"--optuna-storage {url}: folder {folder} does not exist")
        return
    try:
        engine = sqlalchemy.create_engine(url)
        with engine.connect():
            pass
        engine.dispose()
    except Exception as exc:  # noqa: BLE001 - driver missing, refused, bad password: one line
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"--optuna-storage: cannot connect to {redact_url(url)}: {detail}") from None
