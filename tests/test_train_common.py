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
