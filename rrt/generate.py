"""`python -m rrt.generate`: sample text from any model rrt can load, optionally with early exit.

    python -m rrt.generate --source <HF dir | .gguf | rrt dir> --prompt "The capital of France is" \
        --max_new_tokens 32 [--temperature 0.8 --top_k 50 --top_p 0.95 --seed 0] \
        [--exit_rule max_prob --exit_threshold 0.9 [--depthwise_slots 4]]

Greedy by default. `--exit_threshold` (or `--exit_rule agreement`, or `--exit_rule cosine --exit_threshold 0.97`)
turns on per-token early exit after each loop of a recursive model; `--depthwise_slots N` serves the prompts with
the continuous depth-wise batching engine instead of one static batch (the text is the same; see docs/DECODING.md).
Several `--prompt`s decode together. The prompt gets the tokenizer's BOS when its configuration asks for one;
generation stops at EOS unless `--ignore_eos`.
"""

import argparse
import sys
import time

import numpy as np

from rrt import formats
from rrt.decode import cache as decode
from rrt.decode import depthwise, early_exit


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="rrt.generate", description=__doc__.splitlines()[0])
    p.add_argument(
        "--source",
        required=True,
        help="HF dir, .gguf file, rrt model dir or training workdir (local or gs://bucket/run)",
    )
    p.add_argument("--prompt", action="append", required=True, help="prompt text (repeat for a batch)")
    p.add_argument("--max_new_tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    p.add_argument("--top_k", type=int, default=0, help="0: off")
    p.add_argument("--top_p", type=float, default=1.0, help="1: off")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--exit_rule", choices=early_exit.RULES, default=None, help="early exit (default: none)")
    p.add_argument(
        "--exit_threshold",
        type=float,
        default=None,
        help="max_prob or cosine threshold; alone, implies --exit_rule max_prob",
    )
    p.add_argument("--min_exit_loops", type=int, default=1, help="never exit before this many loops")
    p.add_argument("--depthwise_slots", type=int, default=0, help="serve with the depth-wise engine and N slots")
    p.add_argument("--dtype", default=None, help="cast parameters (float32, bfloat16)")
    p.add_argument("--ignore_eos", action="store_true")
    args = p.parse_args(argv)
    if args.max_new_tokens < 1:
        p.error("--max_new_tokens must be >= 1")
    if args.exit_threshold is not None and args.exit_rule is None:
        args.exit_rule = "max_prob"
    if args.exit_rule in ("max_prob", "cosine") and args.exit_threshold is None:
        p.error(f"--exit_rule {args.exit_rule} needs --exit_threshold")
    if args.exit_rule == "agreement" and args.exit_threshold is not None:
        p.error("--exit_rule agreement takes no --exit_threshold")
    if args.depthwise_slots and args.exit_rule is None:
        p.error("--depthwise_slots needs an exit rule (--exit_threshold, or --exit_rule agreement or cosine)")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    model = formats.load_model(args.source, dtype=args.dtype)
    tok = formats.load_tokenizer(args.source)
    cfg = model.cfg
    bos = [tok.bos_id] if tok.add_bos and tok.bos_id is not None else []
    prompts = [bos + tok.encode(text) for text in args.prompt]
    for text, ids in zip(args.prompt, prompts):
        if not ids:
            raise ValueError(
                f"--prompt {text!r} encodes to no tokens (and the tokenizer adds no BOS): nothing to continue"
            )
    longest = max(len(p) for p in prompts)
    limit = formats.check_positions(longest, args.source, "the longest prompt")
    if limit is not None and longest <= limit:
        formats.check_positions(longest + args.max_new_tokens, args.source, "the longest prompt + --max_new_tokens")
    sampling = decode.Sampling(args.temperature, args.top_k, args.top_p)
    rule = None
    if args.exit_rule:
        rule = early_exit.ExitRule(args.exit_rule, args.exit_threshold or 0.0, args.min_exit_loops)
    eos = None if args.ignore_eos else tok.eos_id
    start = time.perf_counter()
    if args.depthwise_slots:
        out = depthwise.generate(model, prompts, args.max_new_tokens, slots=args.depthwise_slots, rule=rule,
                                 sampling=sampling, seed=args.seed, eos_id=eos)  # fmt: skip
    else:
        out = decode.generate(model, prompts, args.max_new_tokens, sampling=sampling, seed=args.seed, rule=rule,
                              eos_id=eos)  # fmt: skip
    seconds = time.perf_counter() - start
    for text, ids in zip(args.prompt, out.tokens):
        print(f"{text}{tok.decode(ids, skip_special_tokens=True)}")
        print("-" * 40)
    n = sum(len(t) for t in out.tokens)
    loops = np.concatenate([x[1:] for x in out.loops if len(x) > 1] or [np.zeros(0)])
    summary = f"{n} tokens in {seconds:.1f}s (compilation included)"
    if rule is not None and loops.size:
        summary += f"; mean exit depth {loops.mean():.2f} of {cfg.n_loops} loops (decoded tokens)"
    print(summary, file=sys.stderr)
    return 0


def run():
    sys.exit(main())


if __name__ == "__main__":
    run()
