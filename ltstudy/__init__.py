"""ltstudy: long-tailed recognition methods on one trainer, tuned at cluster scale."""

import time as _time

__version__ = "0.1.0"

#: when this process began importing ltstudy (a trial's start-up is measured from it, see study.startup)
IMPORT_STARTED = _time.time()
