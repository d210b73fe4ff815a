"""The allowed values of the training settings, defined once for the configurations and the command line.

Light on purpose (no numpy, torch or astropy): the command line builds its
argument choices from it without importing the trainers.
"""

from __future__ import annotations

__all__ = ["MODES", "BEST_METRICS", "CAPTION_MODES", "CLIP_LOSSES", "IMAGE_CACHES", "PRECISIONS", "SCHEDULES",
           "LLAVA_STAGES"]

#: CLIP training set-ups: all weights, frozen towers with MLP heads, random weights, shuffled-caption control
MODES = ("finetune", "head", "scratch", "shuffled")
#: validation metrics that can select a CLIP run's best checkpoint
BEST_METRICS = ("val_loss", "val_top10", "val_top10_batch100")
#: the texts a CLIP run trains on: captions, or runs of sentences of the raw abstracts
CAPTION_MODES = ("caption", "abstract")
#: contrastive losses (open_clip's ClipLoss and SigLipLoss)
CLIP_LOSSES = ("clip", "siglip")
#: how decoded training images are kept (see :mod:`astrovl.datasets.imagecache`)
IMAGE_CACHES = ("auto", "memory", "disk", "none")
#: arithmetic of a CLIP run's forward pass
PRECISIONS = ("auto", "fp32", "bf16")
#: learning rate after the warm-up (:func:`astrovl.training.common.warmup_schedule`)
SCHEDULES = ("constant", "cosine")
#: the two stages of LLaVA training: projector only, then end to end (or LoRA)
LLAVA_STAGES = (1, 2)
