"""Under accelerate/torchrun, process 0 converts an original LLaVA checkpoint once; the others reuse it."""

from __future__ import annotations

import logging
import os
import socket
import time

import pytest

from astrovl.testing.clip import make_tiny_clip_tower
from astrovl.testing.llava import make_tiny_original_llava
from astrovl.utils.distributed import ProcessRanks, main_process_first, process_ranks


@pytest.fixture(scope="module")
def original(tmp_path_factory):
    root = tmp_path_factory.mktemp("orig")
    tower = make_tiny_clip_tower(root / "tower")
    return make_tiny_original_llava(root / "llava-v1.5-tiny", vision_tower=tower, shards=1)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, use_group, original_dir, cache_dir, queue):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    if use_group:
        dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        from astrovl import AstroLLaVA, conf
        from astrovl.clip.identity import weights_digest

        messages = []
        handler = logging.Handler(logging.INFO)
        handler.emit = lambda record: messages.append(record.getMessage())
        logger = logging.getLogger("astrovl.llava.convert")
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        if rank == 0:
            time.sleep(1.0)  # process 0 comes late: only the ordering makes it the one that converts
        with conf.set_temp("cache_dir", cache_dir):
            model = AstroLLaVA.from_pretrained(original_dir, device="cpu")
        converted = sum(m.startswith("converting ") for m in messages)
        reused = sum(m.startswith("reusing the conversion") for m in messages)
        queue.put((rank, converted, reused, weights_digest(model.model)))
    finally:
        if use_group:
            dist.destroy_process_group()


@pytest.mark.parametrize("use_group", [True, False], ids=["process-group", "file-lock"])
def test_one_process_converts_and_the_other_reuses(original, tmp_path, use_group):
    import torch.multiprocessing as mp

    cache = tmp_path / "astrovl-cache"
    queue = mp.get_context("spawn").Queue()
    mp.start_processes(_worker, args=(2, _free_port(), use_group, str(original), str(cache), queue),
                       nprocs=2, join=True, start_method="spawn")
    results = sorted(queue.get(timeout=10) for _ in range(2))
    assert sum(r[1] for r in results) == 1 and sum(r[2] for r in results) == 1  # converted exactly once
    if use_group:
        assert results[0][1:3] == (1, 0) and results[1][1:3] == (0, 1)  # process 0 converted first
    assert results[0][3] == results[1][3]  # the same weights on both
    conversions = [p for p in (cache / "converted-llava").rglob("config.json")]
    assert len(conversions) == 1
    assert not [p for p in (cache / "converted-llava").rglob("*") if p.name.endswith((".part", ".old"))]


def test_ranks_come_from_the_launcher_environment(monkeypatch):
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    assert process_ranks() == ProcessRanks(0, 0, 1, False)
    monkeypatch.setenv("RANK", "5")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "8")
    ranks = process_ranks()
    assert ranks == ProcessRanks(5, 1, 8, False) and not ranks.is_main and not ranks.is_local_main
    monkeypatch.setenv("RANK", "two")
    with pytest.raises(ValueError, match="RANK='two'"):
        process_ranks()


def test_a_single_process_just_runs_the_block(tmp_path, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    lock = tmp_path / "locks" / "step.lock"
    with main_process_first(lock, what="a test step") as ranks:
        assert ranks.world_size == 1 and ranks.is_main
    assert lock.parent.is_dir()
    with pytest.raises(RuntimeError, match="inside"):
        with main_process_first(lock):
            raise RuntimeError("inside")
    with main_process_first(lock):  # the lock was released by the failure
        pass
