"""Puts the repository root on sys.path, so test modules in any folder import ``tests.zoo`` / ``tests.helpers``."""

import pathlib
import sys

ROOT = str(pathlib.Path(__file__).resolve().parent.parent)
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Every optimized model is a new module: without a reset, compiling many of them in one process
    runs into dynamo's recompile limit for the models' shared forward frames."""
    torch._dynamo.reset()
    yield
