"""The input pipeline: text sources -> tokens -> packed rows -> per-host batches, resumable.

Batch format (host-local numpy from `Iterator.__next__`; `to_global` turns each into a batch-sharded jax.Array):
  inputs       int32   [B, T]  token ids fed to the model
  targets      int32   [B, T]  the next token of the same document (inputs shifted by one, per document)
  segment_ids  int32   [B, T]  1, 2, ... for the document pieces of a row, 0 on padding
  positions    int32   [B, T]  0, 1, ... within each document piece, 0 on padding
  loss_mask    float32 [B, T]  1 where `targets` is a real next token, 0 on padding
B = global_batch_size // process_count rows on each host, T = seq_len. The model is called as
`model(inputs, positions, segment_ids)`: attention never crosses a segment, so each document in a row gets the
logits it would get alone. Loss: sum(loss_mask * xent(logits, targets)) / sum(loss_mask).

Modules, in the order data flows: `documents` (sources and their readers), `tokens` (encoding and the
token cache), `ordering` (the global, resumable document order), `packing` (documents -> rows), `pipeline` (the
per-host grain iterator and `to_global`), `tfds` (corpora as TFDS datasets).

Design notes.
* One grain pipeline: `MapDataset.range(...).map(fetch_block)` -> `to_iter_dataset` (threads) -> packing -> `batch`
  -> optionally worker processes (`mp_prefetch`). An element is a block of BLOCK_DOCS documents, not one document:
  grain's per-element bookkeeping then costs ~1 us per document instead of ~50, and a block is tokenized in one
  `encode_batch` call (which runs in Rust, off the GIL).
* The global order (`Order`) is a pure function of (config, position): sources are mixed by a deterministic smooth
  weighted round robin; each source runs through epochs, each a fresh permutation seeded by (seed_s + epoch), as
  grain's `shuffle` + `repeat` reseed. Host h takes global positions h, h + P, h + 2P, ... (P = process_count): it
  reads and tokenizes only its own documents. Documents come from a TFDS split read with `tfds.data_source`
  (array_record, no TensorFlow) or from local files read into memory.
* The shift by one happens per document before packing: a document of n tokens (BOS/EOS added as the tokenizer's
  config says, or as `DataConfig` overrides) gives n - 1 (input, target) pairs, so no target crosses a document
  boundary and `loss_mask` is `segment_ids > 0`. Packing concatenates the pairs; a document longer than what is
  left of a row is split, and its continuation starts a new segment at position 0 in the next row (it could not
  attend to its head anyway). Rows are padded only when the stream ends, which an infinite stream never does.
* State: the packer stores grain's state before the block it is in (an element index) plus the document and token
  offset inside it, so the iterator state is a small JSON-able dict, restored exactly (the block is fetched again):
  a restored iterator yields the same batches as an uninterrupted one. It also records a fingerprint of the config,
  the host layout and the tokenizer, and refuses a state from another pipeline. With workers, grain's state holds
  one such dict per worker; the order then depends on num_workers (deterministically).
* Token cache (`cache_dir`): a source tokenized once is stored as a flat token array + document offsets, named by a
  hash of the tokenizer and the source's content (file bytes; TFDS name, version, split), written atomically so
  concurrent hosts may share a directory. Warm runs then read tokens from memory-mapped arrays instead of
  tokenizing. Building it tokenizes the whole source on every host, so by default only "files" sources (local
  corpora) are cached; TFDS sources, possibly huge, tokenize lazily, each host only its own documents
  (`SourceConfig.cache` overrides either way).
"""
