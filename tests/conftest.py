"""Keep in-process DeepSpeed set-up (a world of one) from leaking launcher variables into later tests."""

from __future__ import annotations

import os

import pytest

from tests.helpers import LAUNCHER_VARS


@pytest.fixture(autouse=True)
def _restore_launcher_env():
    saved = {k: os.environ.get(k) for k in LAUNCHER_VARS}
    yield
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
