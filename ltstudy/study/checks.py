"""What a study checks on the driver before Ray starts: the data is there.

Every failure is one :class:`~ltstudy.errors.LtstudyError` line; nothing is written anywhere.
"""

from __future__ import annotations

from pathlib import Path

from ltstudy.config import TrialConfig, load_data
from ltstudy.errors import DataError
from ltstudy.methods import ImageMethod, get_method


def check_data(cfg: TrialConfig) -> None:
    """Build the study's dataset once on the driver (with ``download``, this is the one download), and for
    file lists check that every listed image exists: a missing, partial or corrupt dataset is one line here
    instead of a traceback in every trial."""
    if not issubclass(get_method(cfg.method), ImageMethod):
        return  # feature-stage studies read the backbone's cache, checked when it is extracted
    data = load_data(cfg)
    if data.image_root is not None:
        root = Path(data.image_root)
        for split in (data.train, data.val, data.test):
            missing = next((p for p in split.paths if not (root / p).is_file()), None)
            if missing is not None:
                raise DataError(f"image {root / missing} listed in the file lists does not exist")
