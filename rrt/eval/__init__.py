"""Evaluation: perplexity after each loop (`perplexity`, `scoring`), the few-shot tasks (`tasks`, `fewshot`), the one
in-process evaluation (`heldout`) and the lm-eval-harness model (`lm_eval_adapter`). The CLI is rrt.evaluate."""
