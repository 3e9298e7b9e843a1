"""What a reused trial process does after each trial (``trainable._release``): one full garbage collection,
then what is still alive frozen, so that the collections after later trials walk only what those made."""

from __future__ import annotations

import subprocess
import sys

PROBE = r"""
import gc, time, weakref
from ltstudy.study.trainable import _release

class Node:
    pass

def cycle():
    a, b = Node(), Node()
    a.other, b.other = b, a
    return weakref.ref(a)

first = cycle()                      # a trial's garbage, made before the first release
_release()
frozen = gc.get_freeze_count()
assert first() is None, "the first trial's cyclic garbage was frozen instead of collected"
assert frozen > 100_000, frozen      # torch, Ray, MLflow: what every later collection no longer walks
later = cycle()                      # a later trial's garbage
tic = time.perf_counter()
_release()
took = time.perf_counter() - tic
assert later() is None, "a later trial's cyclic garbage survived"
assert gc.get_freeze_count() == frozen, "frozen again"
print(f"{took:.4f}")
"""


def test_the_first_release_collects_then_freezes_and_later_ones_still_collect_new_garbage():
    done = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
