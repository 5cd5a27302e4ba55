"""The process thread policy: what each kind chooses, and what applying it changes."""

from __future__ import annotations

import logging
import threading

import faiss
import pytest
import torch

from training.threads import ThreadPolicy, apply_thread_policy, current_thread_policy, idle_cores


def torch_threads_in_a_new_thread() -> int:
    """Torch's thread count as a thread started now sees it: what a request or job thread
    started after the process's start runs with. (FAISS's count in such a thread depends on
    the import order, see training/threads.py; it is checked in the applying thread.)"""
    seen: list[int] = []
    thread = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))
    thread.start()
    thread.join()
    return seen[0]


def test_serving_gives_each_concurrent_inference_its_share() -> None:
    assert ThreadPolicy.serving(2, cores=8).threads == 4
    assert ThreadPolicy.serving(3, cores=8).threads == 2
    assert ThreadPolicy.serving(16, cores=2).threads == 1  # never below one
    assert ThreadPolicy.serving(0, cores=4).threads == 4  # no worker count: one at a time
    assert ThreadPolicy.serving(2, cores=8).kind == "serving"


def test_training_takes_the_idle_cores_shared_by_the_processes_started_together(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr("os.cpu_count", lambda: 8)
    monkeypatch.setattr("os.getloadavg", lambda: (2.2, 0.0, 0.0))
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert idle_cores() == 6
    assert ThreadPolicy.training().threads == 6
    assert ThreadPolicy.training(concurrent=4).threads == 1
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "3")  # a torchrun rank: its node's share
    assert ThreadPolicy.training().threads == 2
    assert ThreadPolicy.training(5).threads == 5  # --threads wins, per process
    monkeypatch.setattr("os.getloadavg", lambda: (30.0, 0.0, 0.0))
    assert ThreadPolicy.training(concurrent=1).threads == 1  # a busy machine: still one


def test_a_policy_needs_a_thread() -> None:
    with pytest.raises(ValueError, match="at least 1 thread"):
        ThreadPolicy(kind="serving", threads=0)


@pytest.mark.usefixtures("restore_thread_policy")
def test_apply_sets_torch_and_faiss_for_this_and_later_threads_and_logs_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Two counts that differ from each other and from whatever the process ran before.
    start = torch.get_num_threads()
    first, second = start + 1, start + 2
    policy = ThreadPolicy(kind="test", threads=first, reason="a test")
    with caplog.at_level(logging.INFO, logger="training.threads"):
        assert apply_thread_policy(policy) is policy
        assert torch.get_num_threads() == first
        assert faiss.omp_get_max_threads() == first
        assert torch_threads_in_a_new_thread() == first
        assert current_thread_policy() == policy
        apply_thread_policy(ThreadPolicy(kind="test", threads=first, reason="a test"))
        lines = [r.getMessage() for r in caplog.records if r.name == "training.threads"]
        assert len(lines) == 1, lines  # the same policy again: nothing to do, nothing logged
        assert f"test: {first} thread(s)" in lines[0] and "a test" in lines[0]

        apply_thread_policy(ThreadPolicy(kind="test", threads=second))
        assert (torch.get_num_threads(), faiss.omp_get_max_threads()) == (second, second)
        assert torch_threads_in_a_new_thread() == second
        assert len([r for r in caplog.records if r.name == "training.threads"]) == 2


@pytest.mark.usefixtures("restore_thread_policy")
def test_apply_again_repairs_counts_changed_behind_its_back() -> None:
    """Idempotent means "the process runs this policy afterwards", not "skipped when called
    before": a Celery pool process re-applies its parent's policy this way."""
    policy = apply_thread_policy(ThreadPolicy(kind="test", threads=torch.get_num_threads() + 1))
    torch.set_num_threads(policy.threads + 1)
    faiss.omp_set_num_threads(policy.threads + 1)
    apply_thread_policy(policy)
    assert (torch.get_num_threads(), faiss.omp_get_max_threads()) == (policy.threads,) * 2
