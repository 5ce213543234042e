"""Thread count of the dynamic audit: one for small CPU models unless the user says otherwise."""

from __future__ import annotations

import torch

from hallway_audit.threads import SMALL_MODEL_PARAMS, cpu_threads


def test_small_cpu_models_run_on_one_thread_and_the_count_is_restored(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("HALLWAY_AUDIT_THREADS", raising=False)
    torch.set_num_threads(2)
    try:
        with cpu_threads(1000, torch.device("cpu")) as n:
            assert n == 1 == torch.get_num_threads()
        assert torch.get_num_threads() == 2
        with cpu_threads(SMALL_MODEL_PARAMS, torch.device("cpu")) as n:
            assert n == 2  # large models keep torch's default
    finally:
        torch.set_num_threads(1)


def test_the_users_thread_settings_win(monkeypatch):
    monkeypatch.delenv("HALLWAY_AUDIT_THREADS", raising=False)
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    torch.set_num_threads(2)
    try:
        with cpu_threads(1000, torch.device("cpu")) as n:
            assert n == 2
        monkeypatch.setenv("HALLWAY_AUDIT_THREADS", "3")
        with cpu_threads(1000, torch.device("cpu")) as n:
            assert n == 3 == torch.get_num_threads()
    finally:
        torch.set_num_threads(1)
