"""LoRA releases of LLaVA models (the AstroLLaVA v1/v2 kind).

Such a release holds a peft adapter (``adapter_config.json`` naming its base
model in ``base_model_name_or_path``, ``adapter_model.safetensors`` or
``adapter_model.bin``) and, when it was trained with the original LLaVA code,
``non_lora_trainables.bin``: the projector trained alongside the adapter (keys
such as ``base_model.model.model.mm_projector.0.weight``). Adapter keys may use
the original repository's module names (``model.layers.N...``); they are mapped
to transformers' ``LlavaForConditionalGeneration`` before peft applies them.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path

from ..exceptions import CheckpointError
from ..utils.imports import optional_import
from .checkpoints import (
    fetch_weights,
    is_original_config,
    load_weights,
    normalize_llava_key,
    read_json,
)
from .hub import ResolvedCheckpoint, fetch_files

__all__ = ["LoRARelease", "apply_lora_release", "PROJECTOR_FILES"]

log = logging.getLogger(__name__)

#: Files that may hold the non-LoRA weights (projector) of a release, in order of preference.
PROJECTOR_FILES = ("non_lora_trainables.safetensors", "non_lora_trainables.bin")

_PEFT_PREFIX = "base_model.model."


@dataclass
class LoRARelease:
    """A LoRA release: its directory, adapter configuration and base model name.

    Attributes
    ----------
    source : ResolvedCheckpoint
    config : dict
        ``adapter_config.json``.
    base : str
        ``base_model_name_or_path`` (the model the adapter applies to).
    trained_with_llava_code : bool
        True when the release comes from the original LLaVA training code (a
        ``llava_llama`` config or a ``non_lora_trainables`` file), so it was
        trained with the Vicuna-v1 conversation format.
    llava_config : dict or None
        The release's own ``config.json`` when it describes a LLaVA model of the
        original code (``mm_vision_tower``...): what the official releases on a
        plain language model (``liuhaotian/llava-v1.5-7b-lora`` on Vicuna) are
        built from.
    """

    source: ResolvedCheckpoint
    config: dict
    base: str
    trained_with_llava_code: bool
    llava_config: dict | None = None

    @classmethod
    def read(cls, source: ResolvedCheckpoint) -> LoRARelease:
        """Read the configuration of the release at ``source``."""
        config = read_json(source.path / "adapter_config.json")
        if config.get("peft_type", "LORA") != "LORA":
            raise CheckpointError(f"{source.name!r} is a {config.get('peft_type')!r} adapter; only LoRA "
                                  "adapters are supported")
        base = config.get("base_model_name_or_path")
        llava_code = any((source.path / f).is_file() for f in PROJECTOR_FILES)
        llava_config = None
        if (source.path / "config.json").is_file():
            cfg = read_json(source.path / "config.json")
            if is_original_config(cfg):
                llava_config = cfg
        return cls(source, config, str(base) if base else "", llava_code or llava_config is not None, llava_config)

    def projector_state(self) -> dict:
        """The non-LoRA weights of the release, renamed for ``LlavaForConditionalGeneration`` ({} if none)."""
        path = self.source.path
        if self.source.repo_id is not None:
            path = fetch_files(self.source.repo_id, PROJECTOR_FILES, revision=self.source.revision)
        files = [path / f for f in PROJECTOR_FILES if (path / f).is_file()]
        if not files:
            return {}
        state = {}
        for key, value in load_weights(files[:1]).items():
            name = normalize_llava_key(_strip_peft(key))
            if name is None:
                raise CheckpointError(f"{str(files[0])!r}: weight {key!r} is not a LLaVA model weight")
            state[name] = value
        return state

    def adapter_state(self) -> dict:
        """The adapter weights, keyed as peft expects them on a ``LlavaForConditionalGeneration``."""
        state = {}
        for key, value in load_weights(fetch_weights(self.source, "adapter")).items():
            name = normalize_llava_key(_strip_peft(key))
            if name is None:
                raise CheckpointError(f"{self.source.name!r}: adapter weight {key!r} does not name a module of a "
                                      "LLaVA model")
            state[_PEFT_PREFIX + name] = value
        return state

    def lora_config(self):
        """The peft ``LoraConfig``, with target modules restricted to the language model.

        The original LLaVA code applies LoRA before the vision tower exists, so its
        module names (``q_proj``...) mean the language model's layers only; in
        transformers' LLaVA the CLIP tower has layers of the same names.
        """
        optional_import("peft", purpose="LoRA adapters")
        from peft import LoraConfig

        fields = {k: v for k, v in self.config.items() if k in LoraConfig.__dataclass_fields__}
        fields.pop("base_model_name_or_path", None)
        fields.pop("revision", None)
        targets = fields.get("target_modules")
        if isinstance(targets, (list, tuple)):
            names = "|".join(re.escape(t) for t in sorted(targets))
            fields["target_modules"] = rf".*language_model\..*\.({names})"
        fields["inference_mode"] = True
        return LoraConfig(**fields)


def _strip_peft(key: str) -> str:
    return key[len(_PEFT_PREFIX):] if key.startswith(_PEFT_PREFIX) else key


def _load_projector(model, state: dict, where: str) -> None:
    import torch

    params = dict(model.named_parameters())
    for name, value in state.items():
        if name not in params:
            raise CheckpointError(f"{where}: weight {name!r} of the release has no counterpart in the base model")
        if tuple(params[name].shape) != tuple(value.shape):
            raise CheckpointError(f"{where}: weight {name!r} has shape {tuple(value.shape)}, the base model "
                                  f"expects {tuple(params[name].shape)}; is base_model_name_or_path right?")
    with torch.no_grad():
        for name, value in state.items():
            params[name].copy_(value.to(params[name].dtype))


def apply_lora_release(model, release: LoRARelease, *, merge: bool = False):
    """Load the release's projector into ``model`` and apply its adapter with peft.

    Parameters
    ----------
    model : transformers.LlavaForConditionalGeneration
        The base model (on its final device).
    release : LoRARelease
    merge : bool
        Merge the adapter into the weights (``merge_and_unload``) and return a
        plain model.

    Returns
    -------
    peft.PeftModel or transformers.LlavaForConditionalGeneration
    """
    optional_import("peft", purpose="LoRA adapters")
    from peft import get_peft_model, set_peft_model_state_dict

    where = repr(release.source.name)
    projector = release.projector_state()
    if projector:
        _load_projector(model, projector, where)
        log.info("loaded %d non-LoRA weights (projector) from %s", len(projector), release.source.name)
    adapter = release.adapter_state()
    peft_model = get_peft_model(model, release.lora_config())
    expected = {k for k in peft_model.state_dict() if ".lora_" in k}
    result = set_peft_model_state_dict(peft_model, adapter)
    unexpected = list(getattr(result, "unexpected_keys", []))
    if unexpected:
        raise CheckpointError(f"{where}: adapter weights {unexpected[:5]} match no module of the base model; "
                              "is base_model_name_or_path right?")
    loaded = {re.sub(r"\.(lora_[AB])\.weight$", r".\1.default.weight", k) for k in adapter}
    missing = sorted(k for k in expected if k not in loaded)
    if missing:
        raise CheckpointError(f"{where}: the adapter has no weights for {len(missing)} LoRA layer(s) of its "
                              f"configuration, e.g. {missing[:3]}")
    log.info("applied the LoRA adapter of %s (r=%s, alpha=%s)", release.source.name, release.config.get("r"),
             release.config.get("lora_alpha"))
    if merge:
        return peft_model.merge_and_unload()
    return peft_model


def release_base(release: LoRARelease, base: str | Path | None) -> str:
    """The base model name to load: ``base`` when given, else the release's own."""
    name = str(base) if base is not None else release.base
    if not name:
        raise CheckpointError(f"{release.source.name!r} names no base model (base_model_name_or_path); pass "
                              "base= the model the adapter was trained on")
    return name
