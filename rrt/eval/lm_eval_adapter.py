"""lm-eval-harness model "rrt": any model rrt can load, scored by the harness's own tasks.

    rrt-lm-eval --model rrt --model_args path=<HF dir | .gguf | rrt dir>[,loop=R][,max_length=N] \
        --tasks hellaswag --num_fewshot 0 --batch_size 8 [--include_path my_tasks/] --output_path out/

Design notes.
* Discovery: lm-eval 0.4.13 finds models only in its own registry and has no plugin hook for them, so `lm_eval
  --model rrt` cannot work. Registration happens on import (`@register_model("rrt")`): `rrt-lm-eval <lm_eval
  arguments>` (this module's `main`: import, then the harness's own CLI, every flag included) or `import
  rrt.eval.lm_eval_adapter` before `lm_eval.simple_evaluate(model="rrt", ...)`.
* loglikelihood goes through `TemplateLM` (the harness's `_encode_pair`, empty-context handling) into
  `rrt.eval.fewshot.loglikelihoods`: packed fixed-shape batches through `rrt.eval.scoring`, so `rrt-evaluate` and
  the harness agree request by request. `loop=r` scores exiting after loop r (default: the last, full depth).
* loglikelihood_rolling: the harness's rolling windows (`get_rolling_token_windows` with the prefix token, context
  length 1, disjoint), each window scored like a loglikelihood request, summed per document.
* generate_until: greedy, one request at a time, recomputing the whole (padded, fixed-shape) sequence each step; no
  KV cache. Stops at EOS, at `max_gen_toks`, or at the first stop string (`until`,
  default the EOS text), which is cut from the output as the harness expects. Sampling arguments are refused.
"""

import sys

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from tqdm import tqdm

from rrt import formats
from rrt.eval import fewshot, scoring


@register_model("rrt")
class RRTLM(TemplateLM):
    """The harness's view of an rrt Decoder and its tokenizer."""

    def __init__(
        self,
        path: str | None = None,
        batch_size: int | str | None = 8,
        max_length: int = fewshot.DEFAULT_MAX_LEN,
        max_gen_toks: int = 256,
        loop: int | None = None,
        dtype: str | None = None,
        model=None,
        tokenizer=None,
        **kwargs,
    ):
        super().__init__()
        if model is None:
            if not path:
                raise ValueError("model 'rrt' needs model_args path=<HF dir | .gguf file | rrt model dir>")
            model, tokenizer = formats.load_model(path, dtype=dtype), formats.load_tokenizer(path)
        if tokenizer is None:
            raise ValueError("RRTLM(model=...) also needs tokenizer=...")
        self.model, self.tokenizer = model, tokenizer
        n_loops = model.cfg.n_loops
        self.loop = n_loops if loop is None else int(loop)
        if not 1 <= self.loop <= n_loops:
            raise ValueError(f"loop={loop} is outside 1..{n_loops} (the model's loops)")
        self._batch_size = 8 if batch_size in (None, "auto") or str(batch_size).startswith("auto") else int(batch_size)
        self._max_length, self.max_gen_toks = int(max_length), int(max_gen_toks)
        self._scorer = scoring.make_scorer(model)
        self._next_token = _make_next_token(model, self.loop - 1)

    # --- tokenization (TemplateLM's hooks) ---------------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        if self.tokenizer.eos_id is None:
            raise ValueError("the tokenizer has no EOS token")
        return self.tokenizer.eos_id

    @property
    def prefix_token_id(self) -> int:
        return self.tokenizer.bos_id if self.tokenizer.bos_id is not None else self.eot_token_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def batch_size(self) -> int:
        return self._batch_size

    @property
    def tokenizer_name(self) -> str:
        return "rrt"

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        """The tokenizer's ids, with BOS when the tokenizer's configuration adds one (add_special_tokens=None) or
        when asked (True); never twice."""
        ids = self.tokenizer.encode(string)
        want = self.tokenizer.add_bos if add_special_tokens is None else add_special_tokens
        bos = self.tokenizer.bos_id
        if want and bos is not None and ids[:1] != [bos]:
            ids = [bos] + ids
        return ids

    def tok_decode(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens)

    # --- the three request types -----------------------------------------------------------------------------
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        if not requests:
            return []
        encoded = [(list(ctx), list(cont)) for _, ctx, cont in requests]
        ll, greedy = fewshot.loglikelihoods(
            self._scorer, encoded, self.batch_size, self.max_length, progress=not disable_tqdm, desc="rrt loglikelihood"
        )
        out = []
        for j, (key, _, _) in enumerate(requests):
            answer = (float(ll[self.loop - 1, j]), bool(greedy[self.loop - 1, j]))
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, answer)
            out.append(answer)
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        windows, owner = [], []
        for i, (string,) in enumerate(req.args for req in requests):
            for ctx, cont in map(
                lm_utils.make_disjoint_window,
                lm_utils.get_rolling_token_windows(
                    token_list=self.tok_encode(string, add_special_tokens=False),
                    prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length,
                    context_len=1,
                ),
            ):
                windows.append((None, ctx, cont))
                owner.append(i)
        scores = self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)
        totals = np.zeros(len(requests))
        for i, (ll, _) in zip(owner, scores):
            totals[i] += ll
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", (req.args[0],), float(total))
        return [float(t) for t in totals]

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        out = []
        for req in tqdm(requests, desc="rrt generate_until", disable=disable_tqdm):
            context, gen_kwargs = req.args
            text = self._generate_one(context, dict(gen_kwargs or {}))
            self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
            out.append(text)
        return out

    def _generate_one(self, context: str, kwargs: dict) -> str:
        until = kwargs.pop("until", None) or [self.tok_decode([self.eot_token_id])]
        until = [until] if isinstance(until, str) else list(until)
        max_new = int(kwargs.pop("max_gen_toks", self.max_gen_toks))
        if kwargs.pop("do_sample", False) or float(kwargs.pop("temperature", 0.0) or 0.0) > 0:
            raise ValueError("model 'rrt' generates greedily only (do_sample=False, temperature=0)")
        ctx = self.tok_encode(context)[-max(1, self.max_length - max_new) :]
        length = min(self.max_length, len(ctx) + max_new)
        buf = np.zeros((1, fewshot._row_len(length, self.max_length)), np.int32)
        buf[0, : len(ctx)] = ctx
        n, generated, text = len(ctx), [], ""
        while len(generated) < max_new and n < buf.shape[1]:
            tok = int(self._next_token(buf, n - 1))
            if tok == self.tokenizer.eos_id:
                break
            buf[0, n] = tok
            n += 1
            generated.append(tok)
            text = self.tok_decode(generated)
            if any(s in text for s in until):
                break
        for s in until:  # the harness expects the text before the first stop sequence
            text = text.split(s)[0] if s else text
        return text


def _make_next_token(model, loop_index: int):
    """(tokens [1, T], index) -> the argmax token after position `index`, exiting after loop `loop_index` + 1."""
    graphdef, state = nnx.split(model)

    @jax.jit
    def next_token(state, tokens_1xT, index):
        m = nnx.merge(graphdef, state)
        _, hiddens_RxBxTxD = m(tokens_1xT, return_loop_hiddens=True)
        h_1xD = jax.lax.dynamic_index_in_dim(hiddens_RxBxTxD[loop_index], index, axis=1, keepdims=False)
        return jnp.argmax(m.logits(h_1xD), axis=-1)[0]

    return lambda tokens, index: next_token(state, jnp.asarray(tokens), jnp.asarray(index, jnp.int32))


def main(argv: list[str] | None = None) -> None:
    """The harness's CLI with model "rrt" registered (this module is imported by then)."""
    from lm_eval.__main__ import cli_evaluate

    if argv is not None:
        sys.argv = [sys.argv[0]] + list(argv)
    cli_evaluate()


if __name__ == "__main__":
    main()
