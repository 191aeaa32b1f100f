"""Tokenizers from Hugging Face directories, sentencepiece models and GGUF vocabularies, behind one small class.

`encode` never adds special tokens: whether a document gets BOS / EOS is the caller's decision, made from the
`add_bos` / `add_eos` flags this tokenizer's own configuration states. A GGUF holds no tokenizer.json, so its
byte-level BPE is rebuilt from `tokenizer.ggml.tokens` / `merges` with the pre-tokenizer llama.cpp names in
`tokenizer.ggml.pre` (SmolLM2's `smollm`: single digits split off, then GPT-2's byte-level regex), as in the original
tokenizer.json; Llama 3's `llama-bpe` and Qwen2's `qwen2` split with their regexes first, as llama.cpp does.
A sentencepiece vocabulary (`tokenizer.ggml.model = llama`: Llama 2, TinyLlama, Mistral v0.1) becomes a `tokenizers`
BPE the way transformers' GGUF loader builds it: merges derived from `tokenizer.ggml.scores`, byte fallback to the
`<0xNN>` pieces, `unknown_token_id` as the unk token, "▁" prepended (Metaspace) to the first piece of text only, and
a Replace / ByteFallback / Fuse / Strip decoder; BOS is added by a template processor when `add_bos_token` is set
(true when absent, as in llama.cpp). Two corners: text that already starts with a space gets no extra "▁" (as in
transformers; sentencepiece itself would prepend one, so `" hi"` decodes back as `"hi"`), and `add_space_prefix =
false` is honoured (no "▁", nothing stripped: sentencepiece's add_dummy_prefix off, as llama.cpp reads it), where
transformers' GGUF loader ignores the key. Any other tokenizer model is refused by name.
`save(dir)` writes tokenizer.json (or tokenizer.model) plus `rrt_tokenizer.json` with the ids and
flags, so a saved tokenizer reloads identically whatever its origin.
"""

import functools
import hashlib
import json
import os

import sentencepiece
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, processors

META = "rrt_tokenizer.json"
HF_JSON = "tokenizer.json"
SP_MODEL = "tokenizer.model"
GGUF_CONTROL, GGUF_USER_DEFINED = 3, 4
# The split regexes of llama.cpp's llama-vocab.cpp (and of the original tokenizer.json files): Llama 3 groups digits in
# threes, Qwen2 splits single digits.
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN2_SPLIT = LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}")


def _split_then_bytes(regex: str):
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(tokenizers.Regex(regex), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )


# tokenizer.ggml.pre -> the pre-tokenizer its merges were learned with.
GGUF_PRE = {
    "smollm": lambda: pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    ),
    "gpt-2": lambda: pre_tokenizers.ByteLevel(add_prefix_space=False),
    "llama-bpe": lambda: _split_then_bytes(LLAMA3_SPLIT),  # Llama 3.x; llama.cpp also calls it llama3 / llama-v3
    "llama3": lambda: _split_then_bytes(LLAMA3_SPLIT),
    "llama-v3": lambda: _split_then_bytes(LLAMA3_SPLIT),
    "qwen2": lambda: _split_then_bytes(QWEN2_SPLIT),  # Qwen2 / Qwen2.5 (no NFC normalizer, as in llama.cpp)
}
# Pre-tokenizers whose whole words are looked up in the vocabulary before any merge (llama.cpp's ignore_merges, and
# `"ignore_merges": true` in Llama 3's tokenizer.json).
GGUF_IGNORE_MERGES = {"llama-bpe", "llama3", "llama-v3"}


class Tokenizer:
    """Text <-> ids over a `tokenizers.Tokenizer` or a `sentencepiece.SentencePieceProcessor`."""

    def __init__(self, backend, bos_id: int | None, eos_id: int | None, add_bos: bool, add_eos: bool):
        self.backend = backend
        self.bos_id, self.eos_id = bos_id, eos_id
        self.add_bos, self.add_eos = bool(add_bos), bool(add_eos)
        self._sp = isinstance(backend, sentencepiece.SentencePieceProcessor)
        self.vocab_size = backend.get_piece_size() if self._sp else backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        """Ids of `text`, without special tokens."""
        return self.backend.encode(text) if self._sp else self.backend.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Ids of many texts at once (the backends' parallel batch paths)."""
        if self._sp:
            return self.backend.encode(list(texts))
        return [e.ids for e in self.backend.encode_batch_fast(list(texts), add_special_tokens=False)]

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        ids = [int(i) for i in ids]
        if self._sp:
            return self.backend.decode(ids)
        return self.backend.decode(ids, skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        if self._sp:
            i = self.backend.piece_to_id(token)
            return None if i == self.backend.unk_id() and token != self.backend.id_to_piece(i) else i
        return self.backend.token_to_id(token)

    @functools.cached_property
    def fingerprint(self) -> str:
        """A hash of the vocabulary, rules and flags: equal fingerprints tokenize identically."""
        blob = self.backend.serialized_model_proto() if self._sp else self.backend.to_str().encode()
        meta = json.dumps([self.bos_id, self.eos_id, self.add_bos, self.add_eos]).encode()
        return hashlib.sha256(blob + meta).hexdigest()[:16]

    def save(self, path: str) -> None:
        """Writes the tokenizer so that `load_tokenizer(path)` reads it back identically."""
        os.makedirs(path, exist_ok=True)
        if self._sp:
            with open(os.path.join(path, SP_MODEL), "wb") as f:
                f.write(self.backend.serialized_model_proto())
        else:
            self.backend.save(os.path.join(path, HF_JSON))
        meta = {"bos_id": self.bos_id, "eos_id": self.eos_id, "add_bos": self.add_bos, "add_eos": self.add_eos}
        with open(os.path.join(path, META), "w") as f:
            json.dump(meta, f, indent=2)


def _read_json(path: str) -> dict:
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        return json.load(f)


def _token_text(token) -> str | None:
    """tokenizer_config.json writes a special token as a string or as {"content": ...}."""
    return token.get("content") if isinstance(token, dict) else token


def from_hf_dir(path: str) -> Tokenizer:
    """tokenizer.json (preferred) or tokenizer.model, with ids and flags from the directory's config files."""
    meta = _read_json(os.path.join(path, META))
    if os.path.isfile(os.path.join(path, HF_JSON)):
        backend = tokenizers.Tokenizer.from_file(os.path.join(path, HF_JSON))
    elif os.path.isfile(os.path.join(path, SP_MODEL)):
        backend = sentencepiece.SentencePieceProcessor(model_file=os.path.join(path, SP_MODEL))
    else:
        raise FileNotFoundError(f"{path}: no {HF_JSON} or {SP_MODEL}")
    if meta:  # written by Tokenizer.save: authoritative
        return Tokenizer(backend, meta["bos_id"], meta["eos_id"], meta["add_bos"], meta["add_eos"])

    tok = Tokenizer(backend, None, None, False, False)
    config = _read_json(os.path.join(path, "tokenizer_config.json"))
    special = _read_json(os.path.join(path, "special_tokens_map.json"))
    model_config = _read_json(os.path.join(path, "config.json"))

    def special_id(kind):
        text = _token_text(config.get(f"{kind}_token") or special.get(f"{kind}_token"))
        i = tok.token_to_id(text) if text else None
        if i is None and isinstance(model_config.get(f"{kind}_token_id"), int):
            i = model_config[f"{kind}_token_id"]
        if i is None and isinstance(backend, sentencepiece.SentencePieceProcessor):
            i = {"bos": backend.bos_id(), "eos": backend.eos_id()}[kind]
        return i if i is None or i >= 0 else None

    tok.bos_id, tok.eos_id = special_id("bos"), special_id("eos")
    if isinstance(backend, sentencepiece.SentencePieceProcessor):
        inferred_bos, inferred_eos = True, False  # the Llama sentencepiece convention
    else:  # what the tokenizer.json post-processor adds around a text
        plain, full = backend.encode("a", add_special_tokens=False).ids, backend.encode("a").ids
        inferred_bos = len(full) > len(plain) and full[0] == tok.bos_id
        inferred_eos = len(full) > len(plain) and full[-1] == tok.eos_id
    tok.add_bos = bool(config.get("add_bos_token", inferred_bos))
    tok.add_eos = bool(config.get("add_eos_token", inferred_eos))
    return tok


def from_gguf(path: str) -> Tokenizer:
    """The tokenizer described by a GGUF file's tokenizer.ggml.* metadata: byte-level BPE (`gpt2`) or a
    sentencepiece vocabulary (`llama`)."""
    from rrt.formats import gguf as gguf_reader

    r = gguf_reader.reader(path)

    def get(key, default=None):
        return gguf_reader.field(r, f"tokenizer.ggml.{key}", default)

    kind = get("model")
    if kind == "gpt2":
        return _gguf_byte_level(path, get)
    if kind == "llama":
        return _gguf_sentencepiece(path, get)
    raise ValueError(
        f"{path}: GGUF tokenizer model {kind!r} is not supported (only byte-level BPE 'gpt2' and sentencepiece 'llama')"
    )


def _gguf_added_tokens(backend: tokenizers.Tokenizer, tokens, types, special_ids=()) -> None:
    """Control tokens (and `special_ids`) as special added tokens, user-defined ones as plain added tokens: llama.cpp
    matches both whole in the text."""
    special_ids = {int(i) for i in special_ids if i is not None and 0 <= int(i) < len(tokens)}
    backend.add_special_tokens(
        [
            tokenizers.AddedToken(t, special=True, normalized=False)
            for i, (t, k) in enumerate(zip(tokens, types, strict=True))
            if k == GGUF_CONTROL or i in special_ids
        ]
    )
    backend.add_tokens(
        [
            tokenizers.AddedToken(t, normalized=False)
            for i, (t, k) in enumerate(zip(tokens, types, strict=True))
            if k == GGUF_USER_DEFINED and i not in special_ids
        ]
    )


def _optional_id(value) -> int | None:
    return None if value is None else int(value)


def _gguf_byte_level(path: str, get) -> Tokenizer:
    pre = get("pre", "default")
    if pre not in GGUF_PRE:
        raise ValueError(f"{path}: GGUF pre-tokenizer {pre!r} is not supported; expected one of {list(GGUF_PRE)}")
    tokens = get("tokens")
    types = get("token_type") or [1] * len(tokens)  # 1: normal
    merges = [tuple(m.split(" ")) for m in get("merges")]
    vocab = {t: i for i, t in enumerate(tokens)}
    bpe = models.BPE(vocab, merges, fuse_unk=False, ignore_merges=pre in GGUF_IGNORE_MERGES)
    backend = tokenizers.Tokenizer(bpe)
    backend.pre_tokenizer = GGUF_PRE[pre]()
    backend.decoder = decoders.ByteLevel()
    _gguf_added_tokens(backend, tokens, types)
    return Tokenizer(
        backend,
        _optional_id(get("bos_token_id")),
        _optional_id(get("eos_token_id")),
        add_bos=get("add_bos_token", False),
        add_eos=get("add_eos_token", False),
    )


def sentencepiece_merges(tokens: list[str], scores: list[float]) -> list[tuple[str, str]]:
    """BPE merges implied by a sentencepiece vocabulary: every split of a piece into two pieces of the vocabulary,
    best piece score first (ties: shorter left, then shorter right part, then vocabulary order). This is
    transformers' `generate_merges(vocab, vocab_scores)`, which its GGUF loader uses for a `llama` vocabulary."""
    vocab = {t: i for i, t in enumerate(tokens)}
    merges = []
    for piece, score in dict(zip(tokens, scores, strict=True)).items():
        splits = ((piece[:k], piece[k:]) for k in range(1, len(piece)))
        local = [(left, right, score) for left, right in splits if left in vocab and right in vocab]
        merges.extend(sorted(local, key=lambda m: (vocab[m[0]], vocab[m[1]])))
    merges.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)  # stable: equal keys keep their order
    return [(left, right) for left, right, _ in merges]


def _gguf_sentencepiece(path: str, get) -> Tokenizer:
    """A sentencepiece (`llama`) vocabulary as a `tokenizers` BPE, built as transformers' GGUF loader builds it: merges
    from the scores, byte fallback, Metaspace with the prefix on the first piece of text only, and a decoder that
    undoes it; BOS from a template processor when the file says add_bos_token (llama.cpp's default for this model)."""
    tokens, scores = get("tokens"), get("scores")
    if tokens is None or scores is None or len(scores) != len(tokens):
        raise ValueError(f"{path}: GGUF sentencepiece vocabulary needs tokenizer.ggml.tokens and scores of one length")
    types = get("token_type") or [1] * len(tokens)
    bos, eos = _optional_id(get("bos_token_id")), _optional_id(get("eos_token_id"))
    unk, pad = _optional_id(get("unknown_token_id")), _optional_id(get("padding_token_id"))
    unk_token = tokens[unk] if unk is not None and 0 <= unk < len(tokens) else None
    vocab = {t: i for i, t in enumerate(tokens)}
    bpe = models.BPE(
        vocab, sentencepiece_merges(tokens, scores), unk_token=unk_token, fuse_unk=True, byte_fallback=True
    )
    backend = tokenizers.Tokenizer(bpe)
    # add_space_prefix: sentencepiece's add_dummy_prefix (default true). "first": not after a special token, and not
    # when the text already starts with a space -- transformers' choice (legacy=False); see the module docstring.
    prefix = bool(get("add_space_prefix", True))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement="\u2581", prepend_scheme="first" if prefix else "never", split=False
    )
    steps = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    backend.decoder = decoders.Sequence(steps + [decoders.Strip(content=" ", left=1)] * prefix)
    _gguf_added_tokens(backend, tokens, types, special_ids=(unk, bos, eos, pad))
    add_bos, add_eos = bool(get("add_bos_token", True)), bool(get("add_eos_token", False))
    for flag, i, name in ((add_bos, bos, "bos"), (add_eos, eos, "eos")):
        if flag and (i is None or not 0 <= i < len(tokens)):
            raise ValueError(f"{path}: GGUF tokenizer.ggml.add_{name}_token is set but {name}_token_id is not valid")
    b, e = (tokens[bos] if add_bos else None), (tokens[eos] if add_eos else None)
    single = [f"{b}:0"] * add_bos + ["$A:0"] + [f"{e}:0"] * add_eos
    pair = single + [f"{b}:1"] * add_bos + ["$B:1"] + [f"{e}:1"] * add_eos
    special = {t: i for t, i, on in ((b, bos, add_bos), (e, eos, add_eos)) if on}
    backend.post_processor = processors.TemplateProcessing(
        single=" ".join(single), pair=" ".join(pair), special_tokens=list(special.items())
    )
    return Tokenizer(backend, bos, eos, add_bos=add_bos, add_eos=add_eos)


def load_tokenizer(source: str) -> Tokenizer:
    """A tokenizer from a .gguf file, a Hugging Face directory, or an rrt checkpoint (its `tokenizer/` subdir)."""
    if os.path.isfile(source) and source.endswith(".gguf"):
        return from_gguf(source)
    if os.path.isdir(os.path.join(source, "tokenizer")):
        return from_hf_dir(os.path.join(source, "tokenizer"))
    if os.path.isdir(source):
        return from_hf_dir(source)
    raise FileNotFoundError(f"{source}: not a .gguf file, a Hugging Face directory or an rrt checkpoint directory")


# Hugging Face tokenizer classes for a sentencepiece model, by HF model_type (a tokenizer.json needs no class).
HF_SP_CLASSES = {"llama": "LlamaTokenizer", "gemma": "GemmaTokenizer"}


def save_hf(tok: Tokenizer, path: str, model_type: str, max_length: int | None = None) -> list[str]:
    """Writes `tok` as transformers reads it: tokenizer.json (or tokenizer.model), tokenizer_config.json and
    special_tokens_map.json, with the bos / eos tokens and the add_bos / add_eos flags. For a tokenizer.json the
    post-processor is also set to add exactly the flagged tokens, so readers that ignore the flags (older
    transformers, tokenizers itself) agree. Returns the file names."""
    os.makedirs(path, exist_ok=True)
    text = lambda i: None if i is None else (tok.backend.id_to_piece(i) if tok._sp else tok.backend.id_to_token(i))  # noqa: E731
    bos, eos = text(tok.bos_id), text(tok.eos_id)
    if tok._sp:
        if model_type not in HF_SP_CLASSES:
            raise ValueError(f"no Hugging Face tokenizer class for a sentencepiece model of a {model_type!r} model")
        files = [SP_MODEL]
        with open(os.path.join(path, SP_MODEL), "wb") as f:
            f.write(tok.backend.serialized_model_proto())
        klass = HF_SP_CLASSES[model_type]
    else:
        backend = tokenizers.Tokenizer.from_str(tok.backend.to_str())  # a copy: rrt's own tokenizer stays as it is
        if (tok.add_bos and bos is None) or (tok.add_eos and eos is None):
            raise ValueError("the tokenizer adds a BOS / EOS token it has no id for")
        single = " ".join([f"{bos}:0"] * tok.add_bos + ["$A:0"] + [f"{eos}:0"] * tok.add_eos)
        pair = single + " " + " ".join([f"{bos}:1"] * tok.add_bos + ["$B:1"] + [f"{eos}:1"] * tok.add_eos)
        special = [(t, i) for t, i, on in ((bos, tok.bos_id, tok.add_bos), (eos, tok.eos_id, tok.add_eos)) if on]
        plain, full = backend.encode("a", add_special_tokens=False).ids, backend.encode("a").ids
        wanted = [tok.bos_id] * tok.add_bos + plain + [tok.eos_id] * tok.add_eos
        if full != wanted:  # the post-processor disagrees with the flags: make it add what they say
            backend.post_processor = processors.TemplateProcessing(
                single=single, pair=pair, special_tokens=list(dict(special).items())
            )
        files = [HF_JSON]
        backend.save(os.path.join(path, HF_JSON))
        klass = "PreTrainedTokenizerFast"
    specials = {k: v for k, v in (("bos_token", bos), ("eos_token", eos)) if v is not None}
    config = {
        "tokenizer_class": klass,
        **specials,
        "add_bos_token": tok.add_bos,
        "add_eos_token": tok.add_eos,
        "clean_up_tokenization_spaces": False,  # rrt decodes without it
    }
    if max_length:
        config["model_max_length"] = int(max_length)
    for name, data in (("tokenizer_config.json", config), ("special_tokens_map.json", specials)):
        with open(os.path.join(path, name), "w") as f:
            json.dump(data, f, indent=2)
        files.append(name)
    return files
