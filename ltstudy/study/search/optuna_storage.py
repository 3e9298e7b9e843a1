"""Where the Optuna studies live: a journal file beside the results, or an RDB (PostgreSQL, MySQL, SQLite).

One storage holds every study of a storage root (``optuna-dashboard <root>/optuna.journal`` shows them all).
An object store cannot hold Optuna's journal, and the driver's home folder would not survive ``ray down``,
so a study on ``s3://`` storage must name one.
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import optuna
import sqlalchemy
from optuna.storages.journal import JournalFileBackend

from ltstudy.errors import ConfigError

#: the Optuna journal of every study under a local storage root
OPTUNA_JOURNAL = "optuna.journal"


def open_optuna_storage(location: str):
    """The Optuna storage that holds every study: a journal file path, or an RDB URL (``sqlite:///…``,
    ``postgresql://…``)."""
    if "://" in location:
        return optuna.storages.RDBStorage(location)
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


def redact_url(url: str) -> str:
    """The URL without its password."""
    parts = urlsplit(url)
    if parts.password:
        netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
        return urlunsplit(parts._replace(netloc=netloc))
    return url
