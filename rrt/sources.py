"""`--source` -> a model and its tokenizer: a Hugging Face directory, a .gguf file, or an rrt directory."""

import dataclasses

from rrt import model as model_lib


def load_model(source: str, dtype: str | None = None, compute_dtype: str | None = None) -> model_lib.Decoder:
    """The Decoder held by `source` (parameters cast to `dtype` if given; activations in `compute_dtype`)."""
    from rrt import checkpoints

    cfg, params = checkpoints.load(source, dtype=dtype)
    if compute_dtype:
        cfg = dataclasses.replace(cfg, dtype=compute_dtype)
    return model_lib.from_params(cfg, params)


def load_tokenizer(source: str):
    from rrt.checkpoints import tokenizer

    return tokenizer.load_tokenizer(source)


def check_vocab(tokenizer, cfg: model_lib.ModelConfig, source: str = "") -> None:
    """A tokenizer whose ids exceed the embedding table would silently read NaN rows: refuse it."""
    if tokenizer.vocab_size > cfg.vocab_size:
        raise ValueError(
            f"tokenizer of {source or 'the source'} has {tokenizer.vocab_size} tokens but the model's embedding has "
            f"{cfg.vocab_size} rows"
        )
