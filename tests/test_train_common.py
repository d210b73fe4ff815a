"""The checkpoint and schedule pieces both trainers share (astrovl.training.common)."""

import json
import math

import pytest
import torch

from astrovl.exceptions import CheckpointError
from astrovl.training.common import (
    checkpoint_to_resume,
    load_checkpoint,
    save_checkpoint,
    warmup_schedule,
)
from astrovl.utils.files import OUTPUT_MARKER


def _closed_form(step: int, warmup: int, total: int, schedule: str) -> float:
    """The multiplier the CLIP schedule had as a hand-written ``lr_lambda``."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def _optimizer(lr=1e-3):
    p = torch.nn.Parameter(torch.zeros(2))
    return torch.optim.AdamW([p], lr=lr)


@pytest.mark.parametrize("schedule", ["constant", "cosine"])
@pytest.mark.parametrize("warmup, total", [(0, 12), (1, 12), (5, 20), (12, 12), (30, 12), (7, 8), (200, 2000)])
def test_warmup_schedule_equals_the_closed_form_at_every_step(schedule, warmup, total):
    opt = _optimizer(1e-3)
    sched = warmup_schedule(opt, warmup, total, schedule)
    got, want = [], []
    for step in range(total + 1):
        got.append(opt.param_groups[0]["lr"])
        assert sched.get_last_lr()[0] == got[-1]
        want.append(1e-3 * _closed_form(step, warmup, total, schedule))
        opt.step()
        sched.step()
    assert got == pytest.approx(want, rel=1e-9, abs=1e-15)


def test_warmup_schedule_rejects_unknown_names():
    with pytest.raises(ValueError, match="schedule='linear'"):
        warmup_schedule(_optimizer(), 2, 10, "linear")
    with pytest.raises(ValueError, match="warmup_steps=-1"):
        warmup_schedule(_optimizer(), -1, 10, "cosine")


class _Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.frozen = torch.nn.Linear(3, 3)
        self.head = torch.nn.Linear(3, 2)


def _run(net, opt, sched, steps):
    lrs = []
    for _ in range(steps):
        loss = net.head(net.frozen(torch.randn(4, 3))).pow(2).sum()
        loss.backward()
        opt.step()
        opt.zero_grad()
        sched.step()
        lrs.append(sched.get_last_lr()[0])
    return lrs


def _setup(seed, trainable_only):
    torch.manual_seed(seed)
    net = _Net()
    if trainable_only:
        net.frozen.requires_grad_(False)
    params = [p for p in net.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2)
    return net, opt, warmup_schedule(opt, 3, 10, "cosine")


@pytest.mark.parametrize("trainable_only", [False, True])
def test_resume_from_a_checkpoint_continues_exactly(tmp_path, trainable_only):
    net, opt, sched = _setup(0, trainable_only)
    full_lrs = _run(net, opt, sched, 8)
    full = {k: v.clone() for k, v in net.state_dict().items()}

    net, opt, sched = _setup(0, trainable_only)
    first = _run(net, opt, sched, 4)
    ckpt = save_checkpoint(tmp_path / "checkpoint", model=net, optimizer=opt, scheduler=sched,
                           state={"step": 4}, trainable_only=trainable_only)
    names = {p.name for p in ckpt.iterdir()}
    weights = "trainable.safetensors" if trainable_only else "model.safetensors"
    assert names == {weights, "optimizer.pt", "scheduler.pt", "rng.pt", "state.json", OUTPUT_MARKER}

    # a fresh process: other weights, other random state, scheduler at step 0
    net2, opt2, sched2 = _setup(0 if trainable_only else 1, trainable_only)
    torch.manual_seed(99)
    state = load_checkpoint(ckpt, model=net2, optimizer=opt2, scheduler=sched2, trainable_only=trainable_only)
    assert state == {"step": 4}
    assert sched2.last_epoch == 4 and sched2.get_last_lr() == sched.get_last_lr()
    rest = _run(net2, opt2, sched2, 4)
    assert first + rest == pytest.approx(full_lrs, rel=1e-12)
    for k, v in net2.state_dict().items():
        torch.testing.assert_close(v, full[k], rtol=0, atol=0)


def test_trainable_checkpoint_refuses_other_trainable_parameters(tmp_path):
    net, opt, sched = _setup(0, True)
    save_checkpoint(tmp_path / "c", model=net, optimizer=opt, scheduler=sched, state={}, trainable_only=True)
    other, opt2, sched2 = _setup(0, False)  # the frozen layer trains too: another stage
    with pytest.raises(CheckpointError, match="trainable weights differ"):
        load_checkpoint(tmp_path / "c", model=other, optimizer=opt2, scheduler=sched2, trainable_only=True)


def test_a_failed_save_leaves_the_previous_checkpoint(tmp_path):
    net, opt, sched = _setup(0, False)
    save_checkpoint(tmp_path / "c", model=net, optimizer=opt, scheduler=sched, state={"step": 1})
    with pytest.raises(TypeError):
        save_checkpoint(tmp_path / "c", model=net, optimizer=opt, scheduler=sched, state={"step": object()})
    assert json.loads((tmp_path / "c" / "state.json").read_text()) == {"step": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]


def test_missing_file_is_a_clear_error(tmp_path):
    net, opt, sched = _setup(0, False)
    save_checkpoint(tmp_path / "c", model=net, optimizer=opt, scheduler=sched, state={})
    (tmp_path / "c" / "optimizer.pt").unlink()
    with pytest.raises(CheckpointError, match="incomplete.*optimizer.pt"):
        load_checkpoint(tmp_path / "c", model=net, optimizer=opt, scheduler=sched)


def test_checkpoint_to_resume(tmp_path):
    assert checkpoint_to_resume(tmp_path, True) is None
    (tmp_path / "checkpoint").mkdir()
    assert checkpoint_to_resume(tmp_path, True) is None  # no state.json: not a finished checkpoint
    (tmp_path / "checkpoint" / "state.json").write_text("{}")
    assert checkpoint_to_resume(tmp_path, True) == tmp_path / "checkpoint"
    assert checkpoint_to_resume(tmp_path, False) is None


def test_checkpoint_of_the_former_lambda_schedule_resumes(tmp_path):
    """Checkpoints written with the former ``LambdaLR(lr_lambda)`` resume at the same learning rate."""
    net, opt, _ = _setup(0, False)
    old = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _closed_form(s, 3, 10, "cosine"))
    first = _run(net, opt, old, 5)
    save_checkpoint(tmp_path / "c", model=net, optimizer=opt, scheduler=old, state={"step": 5})
    rest_old = _run(net, opt, old, 5)

    net2, opt2, sched2 = _setup(1, False)
    load_checkpoint(tmp_path / "c", model=net2, optimizer=opt2, scheduler=sched2)
    assert sched2.last_epoch == 5 and opt2.param_groups[0]["lr"] == pytest.approx(first[-1], rel=1e-12)
    assert _run(net2, opt2, sched2, 5) == pytest.approx(rest_old, rel=1e-9)


def test_worker_error_message_gives_the_workers_own_message():
    from astrovl.exceptions import DatasetError
    from astrovl.training.common import worker_error_message

    wrapped = DatasetError(
        "Caught DatasetError in DataLoader worker process 0.\nOriginal Traceback (most recent call last):\n"
        '  File "x.py", line 1, in f\n    raise DatasetError(msg)\n'
        "astrovl.exceptions.DatasetError: record 'a7': image '/data/a7.fits' could not be read: truncated")
    assert worker_error_message(wrapped) == "record 'a7': image '/data/a7.fits' could not be read: truncated"
    assert worker_error_message(ValueError("plain")) == "plain"
    builtin = ValueError("Caught ValueError in DataLoader worker process 1.\nOriginal Traceback (most recent "
                         "call last):\n  ...\nValueError: bad value")
    assert worker_error_message(builtin) == "bad value"


def test_dataloader_worker_errors_keep_the_record_and_path(tmp_path):
    from astrovl.exceptions import DatasetError
    from astrovl.training.common import named_data_errors

    class Broken(torch.utils.data.Dataset):
        def __len__(self):
            return 2

        def __getitem__(self, i):
            raise DatasetError(f"record 'r{i}': image '/data/r{i}.png' could not be read")

    loader = torch.utils.data.DataLoader(Broken(), batch_size=1, num_workers=1)
    with pytest.raises(DatasetError) as info:
        list(named_data_errors(iter(loader)))
    assert str(info.value) == "record 'r0': image '/data/r0.png' could not be read"


def test_choose_start_never_replaces_a_checkpoint_silently(tmp_path):
    from astrovl.exceptions import OutputDirectoryError
    from astrovl.training.common import choose_start
    from astrovl.utils.files import prepare_output_dir

    run = prepare_output_dir(tmp_path / "run", "clip-training")
    assert choose_start(run, resume=False, overwrite=False, outputs=["checkpoint"]) is None
    assert choose_start(run, resume=True, overwrite=False, outputs=["checkpoint"]) is None  # nothing to resume
    (run / "checkpoint").mkdir()
    (run / "checkpoint" / "state.json").write_text(json.dumps({"step": 7}))
    (run / "metrics.csv").write_text("step\n7\n")
    (run / "mine.txt").write_text("mine")
    with pytest.raises(OutputDirectoryError, match="pass --resume to continue from step 7, or --overwrite"):
        choose_start(run, resume=False, overwrite=False, outputs=["checkpoint"])
    assert choose_start(run, resume=True, overwrite=False, outputs=["checkpoint"]) == 7
    with pytest.raises(ValueError, match="exclude each other"):
        choose_start(run, resume=True, overwrite=True, outputs=["checkpoint"])
    assert choose_start(run, resume=False, overwrite=True, outputs=["checkpoint", "metrics.csv", "best"]) is None
    assert sorted(p.name for p in run.iterdir()) == [OUTPUT_MARKER, "mine.txt"]


def test_settings_differences_split_what_may_change():
    from astrovl.training.common import check_resume_settings, settings_differences

    saved = {"lr": 0.01, "steps": 10, "batch_size": 2, "output_dir": "a", "old_only": 1}
    current = {"lr": 0.5, "steps": 12, "batch_size": 2, "output_dir": "b", "new_only": 2}
    fixed, changed = settings_differences(saved, current, {"steps"}, ignore={"output_dir"})
    assert fixed == {"lr": (0.01, 0.5)} and changed == {"steps": (10, 12)}
    with pytest.raises(CheckpointError, match="lr is 0.5 but the checkpoint was written with 0.01"):
        check_resume_settings("ckpt", saved, current, {"steps"}, ignore={"output_dir"})
    assert check_resume_settings("ckpt", saved, dict(current, lr=0.01), {"steps"}, {"output_dir"}) == {
        "steps": (10, 12)}


def test_check_record_images_lists_every_unreadable_record(tmp_path, m13_path):
    from PIL import Image

    from astrovl.exceptions import DatasetError
    from astrovl.training.common import check_record_images

    Image.new("RGB", (8, 8)).save(tmp_path / "ok.png")
    (tmp_path / "text.png").write_text("not a picture")
    (tmp_path / "cut.fits").write_bytes(m13_path.read_bytes()[:5000])
    records = [("a", tmp_path / "ok.png"), ("b", m13_path), ("c", tmp_path / "gone.fits"),
               ("d", tmp_path / "text.png"), ("e", tmp_path / "cut.fits")]
    with pytest.raises(DatasetError) as info:
        check_record_images(records)
    msg = str(info.value)
    assert msg.startswith("3 of 5 training images cannot be read")
    for rid, name in (("c", "gone.fits"), ("d", "text.png"), ("e", "cut.fits")):
        assert f"record '{rid}'" in msg and name in msg
    assert "record 'a'" not in msg and "record 'b'" not in msg
    check_record_images(records[:2])


@pytest.mark.parametrize("schedule", ["constant", "cosine"])
@pytest.mark.parametrize("warmup, total", [(0, 12), (1, 12), (3, 20), (12, 12), (30, 12), (7, 8)])
def test_warmup_from_zero_gives_the_rates_of_transformers_schedules(schedule, warmup, total):
    """LLaVA's schedule: the rates of transformers' schedulers at every step, and their saved state."""
    from transformers import get_constant_schedule_with_warmup, get_cosine_schedule_with_warmup

    ours_opt, theirs_opt = _optimizer(2e-5), _optimizer(2e-5)
    ours = warmup_schedule(ours_opt, warmup, total, schedule, warmup_from_zero=True)
    theirs = get_cosine_schedule_with_warmup(theirs_opt, warmup, total) if schedule == "cosine" \
        else get_constant_schedule_with_warmup(theirs_opt, warmup)
    for _ in range(total + 2):
        assert ours.get_last_lr() == theirs.get_last_lr()
        assert ours_opt.param_groups[0]["lr"] == theirs_opt.param_groups[0]["lr"]
        for opt, sched in ((ours_opt, ours), (theirs_opt, theirs)):
            opt.step()
            sched.step()
    # a checkpoint written with transformers' scheduler resumes with ours
    again_opt = _optimizer(2e-5)
    again = warmup_schedule(again_opt, warmup, total, schedule, warmup_from_zero=True)
    again.load_state_dict(theirs.state_dict())
    assert again.get_last_lr() == theirs.get_last_lr()


def test_epoch_batches_split_each_epoch_between_processes_and_resume_at_a_position():
    from itertools import islice

    from astrovl.training.batches import EpochBatches, epoch_order

    plans = [EpochBatches(n=11, seed=5, world=2, rank=r, batch_size=2) for r in range(2)]
    first = [list(islice(iter(p), 3)) for p in plans]  # 6 and 5 records: 3 micro-batches each
    records = sorted(i for batches in first for batch in batches for i, _ in batch)
    assert records == list(range(11))  # one epoch: every record once, across the processes
    assert [i for batch in first[0] for i, _ in batch] == list(epoch_order(11, 0, 5)[0::2])
    assert first[0][-1][0][1] == (1, 0)  # the last batch of the epoch points to the next epoch
    # a plan started at the position after a batch goes on as the uninterrupted one
    whole = list(islice(iter(plans[0]), 7))
    epoch, micro = whole[3][0][1]
    again = list(islice(iter(EpochBatches(n=11, seed=5, world=2, rank=0, batch_size=2, epoch=epoch,
                                          micro=micro)), 3))
    assert again == whole[4:7]


def test_run_steps_counts_optimiser_steps_and_stops_at_the_last():
    from astrovl.training.loop import RunState, run_steps

    seen, hooks = [], []

    def train_step(batch):
        seen.append(batch)
        return batch % 2 == 1  # two micro-batches per optimiser step

    state = run_steps(iter(range(100)), RunState(step=1), 4, train_step, lambda s: hooks.append(s.step))
    assert state.step == 4 and hooks == [2, 3, 4] and seen == list(range(6))
    resumed = RunState.resumed({"step": 4, "history": [{"step": 4}], "finished": True, "changed": {"lr": [1, 2]}}, 4)
    assert resumed.finished and resumed.start_step == 4 and resumed.resumes == [{"step": 4, "changed": {"lr": [1, 2]}}]
    assert not RunState.resumed({"step": 4, "finished": True, "changed": {}}, 6).finished
