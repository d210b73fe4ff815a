"""LLaVA validation: an answer-token mean, the same on one process or two (gloo), with even batches."""

from __future__ import annotations

import math
import os
import socket

import numpy as np
import pytest
import torch

from astrovl import AstroLLaVA
from astrovl.datasets import SyntheticSkyDataset
from astrovl.testing.llava import make_tiny_llava
from astrovl.training import LLaVATrainingConfig, train_llava
from astrovl.training.llava_data import LLaVATorchDataset, collate_fn, load_conversation_records
from astrovl.training.llava_validation import token_loss_sum, validation_batches, validation_loss

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_tiny_llava(tmp_path_factory.mktemp("llava") / "tiny")


@pytest.fixture(scope="module")
def sky(tmp_path_factory):
    # 4 validation records whose captions (the stage-1 answers) have different lengths
    return SyntheticSkyDataset.generate(tmp_path_factory.mktemp("sky") / "ds", n_images=8, image_size=32,
                                        classes=["elliptical", "cigar"], seed=0, val_fraction=0.5)


def _config(out, **kw):
    base = dict(stage=1, output_dir=str(out), device="cpu", batch_size=2, max_steps=1, eval_every=1, lr=0.0,
                progress=False, log_every=1, warmup_ratio=0.0, schedule="constant", num_workers=0)
    base.update(kw)
    return LLaVATrainingConfig(**base)


def _val_set(model, sky, n):
    records = load_conversation_records(sky, stage=1, split="val")[:n]
    return LLaVATorchDataset(records, model.processor, max_length=2048, pad_to_square=model.pad_to_square,
                             system=None, stage=1)


@pytest.mark.parametrize("n, world, batch_size", [(1, 2, 2), (3, 2, 1), (5, 4, 2), (7, 3, 2), (0, 2, 1), (4, 1, 3)])
def test_every_process_runs_the_same_number_of_batches_and_each_record_counts_once(n, world, batch_size):
    plans = [validation_batches(n, world=world, rank=r, batch_size=batch_size) for r in range(world)]
    assert len({len(p) for p in plans}) == 1
    assert len(plans[0]) == (math.ceil(math.ceil(n / world) / batch_size) if n else 0)
    counted = sorted(i for p in plans for batch, real in p if real for i in batch)
    assert counted == list(range(n))
    assert all(batch == [0] for p in plans for batch, real in p if not real)
    with pytest.raises(ValueError, match="rank"):
        validation_batches(3, world=2, rank=2)


def test_the_loss_is_the_mean_over_answer_tokens_whatever_the_batches(tiny_dir, sky):
    model = AstroLLaVA.from_pretrained(tiny_dir, device="cpu")
    val = _val_set(model, sky, 4)
    net = model.model.eval()
    collate = collate_fn(model.processor.tokenizer.pad_token_id)
    sums, tokens, means = 0.0, 0, []
    with torch.no_grad():
        for i in range(len(val)):
            batch = collate([val[i]])
            batch.pop("position", None)
            out = net(**batch)  # transformers' own loss: the mean over this record's answer tokens
            n_tok = int((batch["labels"][:, 1:] != -100).sum())
            loss_sum, count = token_loss_sum(out.logits, batch["labels"])
            assert int(count) == n_tok and float(loss_sum) / n_tok == pytest.approx(float(out.loss), rel=1e-5)
            sums, tokens = sums + float(loss_sum), tokens + n_tok
            means.append(float(out.loss))
    lengths = {int((val[i]["labels"] != -100).sum()) for i in range(len(val))}
    assert len(lengths) > 1  # records of different lengths: a mean of means would differ
    expected = sums / tokens
    assert abs(expected - np.mean(means)) > 1e-4
    for bs in (1, 3, 4):
        got = validation_loss(net, val, batch_size=bs, collate_fn=collate, device=torch.device("cpu"))
        assert got == pytest.approx(expected, rel=1e-5)
    assert math.isnan(validation_loss(net, [], batch_size=2, collate_fn=collate, device=torch.device("cpu")))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, tiny_dir, sky_root, out, queue):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    from accelerate import Accelerator

    sky = SyntheticSkyDataset(sky_root)
    # one validation record for two processes: process 1 has none
    res = train_llava(AstroLLaVA.from_pretrained(tiny_dir, device="cpu"), sky,
                      _config(out, max_eval_records=1))
    accelerator = Accelerator(cpu=True)  # the state train_llava set up
    model = res.model
    # three records, one per batch: process 0 runs two batches, process 1 one and a padding batch
    uneven = validation_loss(model.model, _val_set(model, sky, 3), batch_size=1,
                             collate_fn=collate_fn(model.processor.tokenizer.pad_token_id),
                             device=torch.device("cpu"), accelerator=accelerator)
    queue.put((rank, accelerator.num_processes, float(res.history["val_loss"][-1]), uneven))
    accelerator.wait_for_everyone()


def test_two_processes_give_the_single_process_loss(tiny_dir, sky, tmp_path):
    import torch.multiprocessing as mp

    single = train_llava(AstroLLaVA.from_pretrained(tiny_dir, device="cpu"), sky,
                         _config(tmp_path / "single", max_eval_records=1))
    model = single.model
    single_uneven = validation_loss(model.model, _val_set(model, sky, 3), batch_size=1,
                                    collate_fn=collate_fn(model.processor.tokenizer.pad_token_id),
                                    device=torch.device("cpu"))
    queue = mp.get_context("spawn").Queue()
    mp.start_processes(_worker, args=(2, _free_port(), str(tiny_dir), str(sky.root), str(tmp_path / "ddp"), queue),
                       nprocs=2, join=True, start_method="spawn")
    results = sorted(queue.get(timeout=10) for _ in range(2))
    assert [r[:2] for r in results] == [(0, 2), (1, 2)]
    for _, _, val_loss, uneven in results:
        assert val_loss == pytest.approx(float(single.history["val_loss"][-1]), rel=1e-5)
        assert uneven == pytest.approx(single_uneven, rel=1e-5)
