"""GPU slots of the fanned-out `gpu` tasks: each concurrent child sees a GPU of its own, a task
waits while every GPU is taken, and one GPU (or none) changes nothing."""
from __future__ import annotations

import threading

from pipelines.dvc_tasks import GpuSlots


def test_concurrent_claims_get_distinct_gpus_and_wait_for_a_free_one(monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    slots = GpuSlots(count=lambda: 2)
    with slots.claim() as first, slots.claim() as second:
        assert {first["CUDA_VISIBLE_DEVICES"], second["CUDA_VISIBLE_DEVICES"]} == {"0", "1"}
        got: list[dict] = []
        waiter = threading.Thread(target=lambda: got.append(slots.claim().__enter__()))
        waiter.start()
        waiter.join(0.3)
        assert waiter.is_alive() and not got  # both taken: the third waits
    waiter.join(60)
    assert got and got[0]["CUDA_VISIBLE_DEVICES"] in {"0", "1"}


def test_the_workers_own_device_list_is_shared_out(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2, 5")
    slots = GpuSlots(count=lambda: 8)
    with slots.claim() as a, slots.claim() as b:
        assert {a["CUDA_VISIBLE_DEVICES"], b["CUDA_VISIBLE_DEVICES"]} == {"2", "5"}


def test_one_gpu_or_none_adds_nothing(monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    for count in (0, 1):
        slots = GpuSlots(count=lambda count=count: count)
        with slots.claim() as a, slots.claim() as b:
            assert a == b == {}
