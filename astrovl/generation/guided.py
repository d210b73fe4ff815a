"""Schema-guided JSON generation with Outlines, shared by summaries and conversations.

Outlines (>= 1.0) turns a pydantic model into a logits processor that masks, at
every step, the tokens that would leave the JSON schema: whatever the language
model prefers, the text it produces parses into the schema (unless
``max_new_tokens`` cuts it short). The pydantic model then validates it again and
its validators tidy the values; invalid results are retried with a new seed.

Two Outlines backends compile the schema:

``"llguidance"`` (default when the ``llguidance`` package is installed)
    computes each token mask lazily from a token trie. It starts in about a second
    even for vocabularies of 262k tokens (Gemma 3) and adds little time per token.
``"outlines_core"`` (Outlines' own default)
    precompiles an index over every state of the schema's automaton and every
    token. Schemas with bounded lists and strings (ours: nothing can run away)
    have many states, so with a large vocabulary the index takes tens of seconds
    and gigabytes of memory; with 32k-token vocabularies (Mistral/Mixtral) it is fine.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import warnings
from dataclasses import dataclass, field
from typing import Any, ClassVar

try:
    from pydantic import BaseModel, ValidationError
except ImportError as exc:
    from ..utils.imports import missing_dependency

    raise missing_dependency("pydantic", purpose="structured (JSON schema) generation") from exc

from ..exceptions import GenerationError
from ..utils.imports import optional_import
from .cache import JSONLCache, cache_key

__all__ = ["GuidedJSONGenerator", "GenerationReport", "default_backend", "JSON_SCHEMA_EXTRA"]

log = logging.getLogger(__name__)

BACKENDS = ("llguidance", "outlines_core", "xgrammar")

#: Extra JSON schema keys of our output types: llguidance allows unbounded whitespace
#: between JSON tokens by default (a weak model can fill its whole token budget with
#: line breaks); this bounds it to one optional space, as outlines_core does.
JSON_SCHEMA_EXTRA = {"x-guidance": {"whitespace_pattern": "[ ]?"}}


def default_backend(tokenizer=None) -> str:
    """The Outlines backend used when none is given.

    ``"llguidance"`` when installed and the tokenizer is a fast (Rust) tokenizer,
    else ``"outlines_core"``.
    """
    fast = tokenizer is None or bool(getattr(tokenizer, "is_fast", False))
    if fast and importlib.util.find_spec("llguidance") is not None:
        return "llguidance"
    return "outlines_core"


def has_chat_template(tokenizer) -> bool:
    """True if ``tokenizer`` has a chat template (the same test Outlines makes)."""
    try:
        tokenizer.get_chat_template()
    except (ValueError, AttributeError, TypeError):
        return False
    return True


@dataclass
class GenerationReport:
    """Counts of a generator's work since it was created.

    Attributes
    ----------
    generated : int
        Results produced by the model (valid on some attempt).
    cached : int
        Results served from the cache without running the model.
    failed : int
        Inputs for which every attempt failed (the result was None).
    attempts : int
        Model calls, including retries.
    failures : list of (str, str)
        ``(input excerpt, last error)`` of each failed input.
    """

    generated: int = 0
    cached: int = 0
    failed: int = 0
    attempts: int = 0
    failures: list[tuple[str, str]] = field(default_factory=list)

    def __str__(self) -> str:
        return (f"generated: {self.generated}, cached: {self.cached}, failed: {self.failed}, "
                f"model calls: {self.attempts}")


class GuidedJSONGenerator:
    """Generate pydantic-validated JSON from a transformers causal LM with Outlines.

    Subclasses define the output type, the prompt and :attr:`prompt_version`.

    Parameters
    ----------
    model : transformers.PreTrainedModel
        A causal language model (e.g. from :func:`~astrovl.generation.load_causal_lm`).
    tokenizer : transformers.PreTrainedTokenizerBase
        Its tokenizer; it must have an end-of-sequence token.
    output_type : type of pydantic.BaseModel
        The schema the output must follow.
    max_new_tokens : int
        Token budget of one attempt.
    max_retries : int
        Attempts after the first one (so at most ``1 + max_retries`` model calls per input).
        The first attempt decodes greedily; retries sample with a new seed and a higher
        temperature.
    seed : int
        Base seed of the retries (attempt ``k`` uses ``seed + k``); the global random
        state is left untouched.
    cache : str, path-like or JSONLCache, optional
        JSON Lines file of finished results keyed by model, prompt version and input,
        so interrupted or repeated runs resume without calling the model again.
    backend : str, optional
        Outlines backend (``"llguidance"``, ``"outlines_core"``, ``"xgrammar"``);
        default :func:`default_backend`.
    model_id : str, optional
        Name of the model in cache keys; default the model's ``name_or_path``.
    """

    #: Changes whenever the prompt or schema changes, so old cache entries are not reused.
    prompt_version: ClassVar[str] = "v1"

    def __init__(self, model, tokenizer, output_type: type[BaseModel], *, max_new_tokens: int,
                 max_retries: int, seed: int = 0, cache: str | os.PathLike | JSONLCache | None = None,
                 backend: str | None = None, model_id: str | None = None):
        if int(max_new_tokens) < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
        if int(max_retries) < 0:
            raise ValueError(f"max_retries must be 0 or more, got {max_retries}")
        if getattr(tokenizer, "eos_token_id", None) is None:
            raise GenerationError(
                f"tokenizer {type(tokenizer).__name__} has no end-of-sequence token, which guided "
                "generation needs to stop; set tokenizer.eos_token (e.g. tokenizer.eos_token = '</s>')"
            )
        if backend is not None and backend not in BACKENDS:
            raise ValueError(f"backend={backend!r} is not known; use one of {list(BACKENDS)} or None")
        self.model = model
        self.tokenizer = tokenizer
        self.output_type = output_type
        self.max_new_tokens = int(max_new_tokens)
        self.max_retries = int(max_retries)
        self.seed = int(seed)
        self.backend = backend or default_backend(tokenizer)
        self.model_id = model_id or str(getattr(model, "name_or_path", "") or type(model).__name__)
        if cache is None or isinstance(cache, JSONLCache):
            self.cache = cache
        else:
            self.cache = JSONLCache(cache)
        self.report = GenerationReport()
        self.use_chat_template = has_chat_template(tokenizer)
        self._generator = None

    def __repr__(self) -> str:
        cache = str(self.cache.path) if self.cache is not None else None
        return (f"<{type(self).__name__} model={self.model_id!r} backend={self.backend!r} "
                f"max_new_tokens={self.max_new_tokens} max_retries={self.max_retries} cache={cache!r}>")

    # ------------------------------------------------------------------ outlines
    @property
    def generator(self):
        """The Outlines generator (built on first use; building compiles the schema)."""
        if self._generator is None:
            optional_import("outlines", purpose="guided JSON generation")
            import outlines

            if getattr(self.tokenizer, "pad_token_id", None) is None:
                self.tokenizer.pad_token = self.tokenizer.eos_token
            omodel = outlines.from_transformers(self.model, self.tokenizer)
            self._generator = outlines.Generator(omodel, self.output_type, backend=self.backend)
        return self._generator

    def _ensure_generator(self) -> None:
        """Build the generator, turning set-up problems into one clear error (not per-item failures)."""
        if self._generator is not None:
            return
        try:
            self.generator  # noqa: B018
        except ImportError:
            raise
        except Exception as exc:
            raise GenerationError(
                f"could not set up guided generation of {self.output_type.__name__} with the Outlines "
                f"backend {self.backend!r}: {type(exc).__name__}: {exc}. Try another backend "
                f"(backend='llguidance' or 'outlines_core')"
            ) from exc

    def _model_input(self, prompt: str):
        """Wrap ``prompt`` as a chat message when the tokenizer has a chat template."""
        if self.use_chat_template:
            optional_import("outlines", purpose="guided JSON generation")
            from outlines.inputs import Chat

            return Chat([{"role": "user", "content": prompt}])
        return prompt

    def _device(self):
        import torch

        try:
            return next(self.model.parameters()).device
        except (StopIteration, AttributeError, TypeError):
            return torch.device("cpu")

    @contextlib.contextmanager
    def _generation_context(self, seed: int):
        """Inference mode, a forked and seeded RNG, and eager token-mask kernels on a CPU."""
        import torch

        device = self._device()
        with contextlib.ExitStack() as stack:
            if device.type == "cpu" and hasattr(torch.compiler, "set_stance"):
                # the token-mask kernels of the backends are decorated with torch.compile,
                # whose first call compiles C++ for half a minute on a CPU; eager is as fast
                stack.enter_context(torch.compiler.set_stance("force_eager"))
            devices = [device.index or 0] if device.type == "cuda" else []
            stack.enter_context(torch.random.fork_rng(devices=devices))
            stack.enter_context(torch.inference_mode())
            torch.manual_seed(seed)
            if device.type == "cuda":
                torch.cuda.manual_seed(seed)
            yield

    def _run_model(self, prompt: str, attempt: int) -> str:
        """One model call; returns the generated text."""
        kwargs: dict[str, Any] = {"max_new_tokens": self.max_new_tokens}
        if attempt == 0:
            kwargs["do_sample"] = False
        else:
            kwargs.update(do_sample=True, temperature=min(0.5 + 0.2 * attempt, 1.2), top_p=0.95)
        generator = self.generator
        with self._generation_context(self.seed + attempt):
            out = generator(self._model_input(prompt), **kwargs)
        if isinstance(out, list):  # a batch of one
            out = out[0]
        return str(out)

    def _run_batch(self, prompts: list[str]) -> list[str]:
        """The first (greedy) attempt for several prompts in one ``generate`` call (left padding)."""
        generator = self.generator
        with self._generation_context(self.seed), warnings.catch_warnings():
            # rows that finished keep receiving padding tokens until the whole batch is done;
            # llguidance's matcher of such a row reports that it has stopped. Their text is
            # complete, and every output is validated against the schema anyway.
            warnings.filterwarnings("ignore", message="Error in LLMatcher", category=UserWarning)
            out = generator.batch([self._model_input(p) for p in prompts], max_new_tokens=self.max_new_tokens,
                                  do_sample=False)
        return [str(o[0] if isinstance(o, list) else o) for o in out]

    def _parse(self, text: str) -> BaseModel:
        """Validate generated text against the output type (raises on invalid output)."""
        return self.output_type.model_validate_json(text)

    # ------------------------------------------------------------------ main loop
    def _key(self, text: str, *extra: Any) -> str:
        return cache_key(self.model_id, type(self).__name__, self.prompt_version, *extra, text)

    def _cached(self, key: str, label: str) -> BaseModel | None:
        if self.cache is None or key not in self.cache:
            return None
        try:
            result = self.output_type.model_validate(self.cache.get(key))
        except ValidationError:
            log.warning("cached result for %s does not fit the schema; generating again", label)
            return None
        self.report.cached += 1
        return result

    def _accept(self, text: str, key: str, label: str, attempt: int) -> tuple[BaseModel | None, str]:
        """Parse one attempt's text; store a valid result. Returns ``(result or None, error)``."""
        try:
            result = self._parse(text)
        except (ValidationError, ValueError) as exc:
            error = f"invalid output {text[:200]!r}: {str(exc).splitlines()[0]}"
            log.debug("attempt %d for %s gave invalid output: %s", attempt + 1, label, error)
            return None, error
        self.report.generated += 1
        if self.cache is not None:
            self.cache.put(key, result.model_dump(mode="json"))
        return result, ""

    def _generate(self, prompt: str, key: str, label: str, *, first_attempt: int = 0,
                  last_error: str = "no attempt made") -> BaseModel | None:
        """Cached, retried generation of one result; None when every attempt fails."""
        if first_attempt == 0:
            cached = self._cached(key, label)
            if cached is not None:
                return cached
        self._ensure_generator()
        for attempt in range(first_attempt, self.max_retries + 1):
            self.report.attempts += 1
            try:
                text = self._run_model(prompt, attempt)
            except (KeyboardInterrupt, SystemExit, MemoryError):
                raise
            except Exception as exc:  # a failing backend must not stop a batch
                last_error = f"{type(exc).__name__}: {exc}"
                log.debug("attempt %d for %s failed: %s", attempt + 1, label, last_error)
                continue
            result, error = self._accept(text, key, label, attempt)
            if result is not None:
                return result
            last_error = error
        self.report.failed += 1
        self.report.failures.append((label, last_error))
        log.warning("no valid %s for %s after %d attempt(s); last error: %s",
                    self.output_type.__name__, label, self.max_retries + 1, last_error)
        return None

    def _generate_many(self, items: list[tuple[str, str, str]], *, batch_size: int = 8,
                       progress: bool | None = True, desc: str = "generating", unit: str = "item",
                       skipped: int = 0) -> list[BaseModel | None]:
        """:meth:`_generate` for many ``(prompt, key, label)`` items, first attempts in batches.

        The first attempt of every uncached item is greedy, so ``batch_size`` of them
        run in one left-padded ``generate`` call through the same Outlines
        generator; items whose output does not validate are retried one at a time,
        exactly as :meth:`_generate` does. With ``batch_size=1`` this is
        :meth:`_generate` item after item. ``skipped`` inputs the caller settled
        without the model are counted in the progress bar.
        """
        from ..utils.progress import progress_bar

        if int(batch_size) < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        results: list[BaseModel | None] = [None] * len(items)
        todo: list[int] = []
        first_of_key: dict[str, int] = {}
        repeats: list[tuple[int, int]] = []
        for i, (_, key, label) in enumerate(items):
            cached = self._cached(key, label)
            if cached is not None:
                results[i] = cached
            elif self.cache is not None and key in first_of_key:
                repeats.append((i, first_of_key[key]))  # served from the cache once its twin is made
            else:
                first_of_key.setdefault(key, i)
                todo.append(i)
        bar = progress_bar(total=len(items) + skipped, enabled=progress, desc=desc, unit=unit)
        bar.update(skipped + len(items) - len(todo) - len(repeats))
        for start in range(0, len(todo), int(batch_size)):
            chunk = todo[start:start + int(batch_size)]
            if len(chunk) == 1:
                prompt, key, label = items[chunk[0]]
                results[chunk[0]] = self._generate(prompt, key, label)
                bar.update(1)
                continue
            self._ensure_generator()
            self.report.attempts += len(chunk)
            try:
                texts = self._run_batch([items[i][0] for i in chunk])
                errors = [""] * len(chunk)
            except (KeyboardInterrupt, SystemExit, MemoryError):
                raise
            except Exception as exc:  # as for one item: the retries decide
                texts, errors = [None] * len(chunk), [f"{type(exc).__name__}: {exc}"] * len(chunk)
            for i, text, error in zip(chunk, texts, errors):
                prompt, key, label = items[i]
                result = None
                if text is not None:
                    result, error = self._accept(text, key, label, 0)
                results[i] = result if result is not None else self._generate(
                    prompt, key, label, first_attempt=1, last_error=error)
                bar.update(1)
        for i, twin in repeats:
            if results[twin] is not None:
                self.report.cached += 1
                results[i] = results[twin]
            else:
                results[i] = self._generate(*items[i])
            bar.update(1)
        bar.close()
        return results

    @classmethod
    def _from_pretrained_kwargs(cls, name_or_path, *, gguf_file=None, device=None, dtype=None,
                                trust_remote_code=False):
        from .lm import load_causal_lm, model_id

        model, tokenizer = load_causal_lm(name_or_path, gguf_file=gguf_file, device=device,
                                          dtype=dtype, trust_remote_code=trust_remote_code)
        return model, tokenizer, model_id(name_or_path, gguf_file)


def excerpt(text: str, n: int = 60) -> str:
    """A one-line excerpt of ``text`` for logs and reports."""
    one = " ".join(str(text).split())
    return one if len(one) <= n else one[: n - 3] + "..."
