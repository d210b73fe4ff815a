"""The validation loss of LLaVA training, the same on one process or many.

The loss is the mean over *answer tokens*: the sum of the token losses of every
validation record divided by the number of answer tokens, over all processes
together. It does not depend on how the records are cut into batches or dealt
to processes (a mean of per-batch or per-process means would weigh a short
answer like a long one, and a process with fewer records like one with more).

With several processes the records are dealt round-robin (process ``r`` takes
records ``r, r + P, r + 2P...``) and every process runs the *same number* of
forward passes: a process with fewer records (or none, when there are fewer
records than processes) runs padding batches (the first record again) whose
tokens are not counted. Forward passes that hold collectives (DeepSpeed ZeRO-3
gathers the partitioned weights in every layer) then always meet their partners,
and the two sums (loss, tokens) are added over the processes with one all-reduce
at the end.
"""

from __future__ import annotations

import math

from .llava_data import IGNORE_INDEX

__all__ = ["validation_batches", "token_loss_sum", "validation_loss"]


def validation_batches(n: int, *, world: int = 1, rank: int = 0,
                       batch_size: int = 1) -> list[tuple[list[int], bool]]:
    """The validation batches of process ``rank``: ``(record indices, counted)`` pairs.

    Every process gets ``ceil(ceil(n / world) / batch_size)`` batches; the
    batches after a process's own records are padding (``counted`` False) made
    of record 0. With ``n == 0`` there are none.

    Examples
    --------
    >>> validation_batches(3, world=2, rank=0, batch_size=1)
    [([0], True), ([2], True)]
    >>> validation_batches(3, world=2, rank=1, batch_size=1)
    [([1], True), ([0], False)]
    >>> validation_batches(1, world=2, rank=1, batch_size=4)
    [([0], False)]
    """
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"rank={rank} must be in [0, {world}) with world={world} >= 1")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1")
    if n <= 0:
        return []
    mine = list(range(rank, n, world))
    total = math.ceil(math.ceil(n / world) / batch_size)
    batches = [(mine[i:i + batch_size], True) for i in range(0, len(mine), batch_size)]
    return batches + [([0], False)] * (total - len(batches))


def token_loss_sum(logits, labels):
    """Summed next-token cross-entropy and the number of tokens it covers.

    Parameters
    ----------
    logits : torch.Tensor, shape (B, L, V)
    labels : torch.Tensor, shape (B, L)
        Token ids, ``-100`` where no loss is taken; position ``i`` of the logits
        predicts label ``i + 1``.

    Returns
    -------
    loss_sum, count : torch.Tensor
        0-d float32 sum of the token losses and 0-d int64 number of tokens.
    """
    import torch

    target = labels[:, 1:].to(logits.device)
    pred = logits[:, :-1].float()
    loss = torch.nn.functional.cross_entropy(pred.reshape(-1, pred.shape[-1]), target.reshape(-1),
                                             ignore_index=IGNORE_INDEX, reduction="sum")
    return loss, (target != IGNORE_INDEX).sum()


def validation_loss(net, dataset, *, batch_size: int, collate_fn, device, accelerator=None) -> float:
    """The mean answer-token loss of ``net`` on ``dataset`` over all processes (see the module notes).

    Parameters
    ----------
    net : torch.nn.Module
        The LLaVA model (as prepared by accelerate); called without labels.
    dataset : sequence
        The encoded validation records (``input_ids``, ``labels``, ``pixel_values``).
    batch_size : int
    collate_fn : callable
        Turns a list of records into a batch.
    device : torch.device
    accelerator : accelerate.Accelerator, optional
        Gives the process's rank and the number of processes, and adds the sums
        over them; None for one process.

    Returns
    -------
    float
        NaN when there is no answer token at all.
    """
    import torch

    world = accelerator.num_processes if accelerator is not None else 1
    rank = accelerator.process_index if accelerator is not None else 0
    # loss sum and token count, added on the device; read back once
    sums = torch.zeros(2, dtype=torch.float32 if device.type == "mps" else torch.float64, device=device)
    was_training = net.training
    net.eval()
    try:
        with torch.no_grad():
            for indices, counted in validation_batches(len(dataset), world=world, rank=rank,
                                                       batch_size=batch_size):
                batch = collate_fn([dataset[i] for i in indices])
                batch.pop("position", None)
                labels = batch.pop("labels")
                batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
                loss, count = token_loss_sum(net(**batch).logits, labels)
                if counted:
                    sums += torch.stack([loss.to(sums.dtype), count.to(sums.dtype)])
    finally:
        if was_training:
            net.train()
    if world > 1:
        sums = accelerator.reduce(sums, "sum")
    loss_sum, tokens = (float(v) for v in sums.cpu())
    return loss_sum / tokens if tokens > 0 else float("nan")
