"""Registry errors."""

from __future__ import annotations

import pytest

from ltstudy.errors import ConfigError
from ltstudy.models import build_model, list_heads, list_models


def test_unknown_model_names_choices():
    with pytest.raises(ConfigError) as info:
        build_model("resnet1000", 10)
    msg = str(info.value)
    assert "resnet1000" in msg and all(n in msg for n in list_models())


def test_unknown_head_names_choices():
    with pytest.raises(ConfigError) as info:
        build_model("resnet32", 10, head="mlp")
    msg = str(info.value)
    assert "mlp" in msg and all(n in msg for n in list_heads())


@pytest.mark.parametrize("bad", [0, -3, 2.5, True])
def test_bad_num_classes(bad):
    with pytest.raises(ConfigError):
        build_model("resnet32", bad)
