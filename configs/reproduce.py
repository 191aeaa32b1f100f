"""The paper's findings at small scale: SmolLM2-135M (30 layers) as 15 x 2 recursive models, each uptrained briefly.

    python experiments/reproduce/driver.py --out runs/reproduce                  # all 15 runs, evals, docs/RESULTS.md
    python experiments/reproduce/driver.py --out runs/reproduce --dry-run        # the variants and their command lines
    python experiments/reproduce/driver.py --out runs/reproduce_gpu --budget_scale 100  # GPU/TPU: 100x tokens, evals
    python -m rrt.train --config configs/reproduce.py --workdir W [--config.x=y ...]   # one run (what it launches)

experiments/reproduce/driver.py trains 15 runs of this config that differ only by their `--config.recursion.*` and
`--config.loss.*` overrides (the original model; strict CYCLE with 4 inits; SEQUENCE with its best init; relaxed
ranks 16/64/256 x SVD/zero LoRA init; relaxed Stepwise; distillation; early exit), all with the same token budget.

Budget (the default, sized for 2 CPU cores): 12 steps of 4 x 256 tokens = 12,288 tokens per run (184k over the 15
runs). Each model is evaluated before and after uptraining on 8 windows of 256 tokens of each held-out tail
(TinyStories, Shakespeare: 2,048 tokens each) and on the first 20 items of each of the seven tasks, 0-shot.

Cost, measured on this 2-core AMD EPYC VM (2026-12-01/02, the run behind docs/RESULTS.md; nothing else running but
two 1-minute nice-19 test runs): 6,525 s = 1 h 49 min of wall clock in all (`/usr/bin/time`; run in two invocations,
874 s + 5,651 s, the second resuming the first): 66 min of training (a run takes 3.7-5.5 min: start-up, conversion,
compilation and 12 steps of ~15-20 s; rank 256 and distillation cost the most) and 41 min of evaluation (26
evaluations of 1.3-2.1 min: perplexity ~20 s, the seven tasks ~65 s; the zero-init variants share one
before-uptraining evaluation, being the same function at every rank), plus the SEQUENCE init selection and
conversions. The previous budget (16 perplexity windows, the head applied at every position of a few-shot row) took
2 h 08 min.
`--budget_scale X` multiplies the steps, warmup, checkpoint interval, task items and perplexity windows by X.
"""

from rrt import config


def get_config():
    c = config.get_config()
    c.source = "smollm2"  # the packaged SmolLM2-135M GGUF
    # The model-defining fields (loops, strategy, init, ranks, lora_init) are set by every variant explicitly.
    c.recursion.loops = 2  # 15 shared layers x 2 loops
    c.recursion.strategy = "cycle"
    c.recursion.init = "stepwise"
    c.data.seq_len = 256
    c.data.global_batch_size = 4
    c.steps = 12  # the default (2-CPU) budget: 12 x 4 x 256 = 12,288 tokens per run
    c.optim.lr = 1e-4  # shared weights and embeddings
    c.optim.lora_lr = 3e-4  # LoRA factors (relaxed variants)
    c.optim.warmup_steps = 2
    c.optim.weight_decay = 0.0
    c.loss.log_all_loops = False  # intermediate loops are scored by the driver's evals (saves a head forward)
    c.checkpoint_every = 12  # the final checkpoint only (it marks the run finished); a run takes 3-6 min
    c.keep_checkpoints = 1  # ~1.6 GB each (params + Adam state)
    c.log_every = 1
    c.async_checkpoint = False
    # experiments/reproduce/driver.py evaluates each model before and after uptraining: each held-out tail, 7 tasks.
    c.eval.heldout = ""  # so rrt.train's own final evaluation is skipped (the driver's after-eval covers it)
    c.eval.tasks = ""
    c.eval.max_windows = 8  # perplexity windows of eval.seq_len tokens per held-out tail
    c.eval.seq_len = 256
    c.eval.limit = 20  # items per task (the first `limit` of each file)
    c.eval.shots = 0
    return c
