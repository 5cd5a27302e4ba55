"""The training tests' process start."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session", autouse=True)
def one_thread_per_test_process() -> None:
    """The test process's thread policy, applied once like at any process's start (train()
    never sets threads): one thread, what the tests' configs say (`threads=1`). The tests are
    small and the machine is shared, where more threads than idle cores slow training down."""
    from training.threads import ThreadPolicy, apply_thread_policy

    apply_thread_policy(ThreadPolicy.training(1))
