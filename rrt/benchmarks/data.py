"""Input pipeline throughput on one core: `python -m rrt.benchmarks.data` (about a minute).

Measures tokens/s delivered by `rrt.data.make_iterator` (tokens = real (input, target) pairs, padding excluded) with the
SmolLM2 tokenizer on the shared corpora, pinned to one CPU core:
  cold   no token cache: every document is tokenized as it is read (the first run on a new corpus, or a corpus too
         large to cache)
  cache  building the on-disk token cache (batched tokenization), once per corpus and tokenizer
  warm   tokens read from that cache (memory-mapped), shuffled, packed and batched
"""

import argparse
import os
import tempfile
import time

# One core: limit the tokenizer's Rust thread pool before it is imported, and pin this process.
os.environ.setdefault("RAYON_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from rrt.data import documents, pipeline, tokens  # noqa: E402
from rrt.formats import gguf, tokenizer  # noqa: E402

CORPORA = ("../shared/data/corpora/tinystories_val.txt", "../shared/data/corpora/tinyshakespeare.txt")


def _throughput(cfg: pipeline.DataConfig, tok, seconds: float) -> tuple[float, int]:
    """(tokens/s, batches) over `seconds` after one warm-up batch."""
    it = pipeline.make_iterator(cfg, tok, process_index=0, process_count=1)
    next(it)
    tokens = batches = 0
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        tokens += int(next(it)["loss_mask"].sum())
        batches += 1
    elapsed = time.perf_counter() - start
    it.close()
    return tokens / elapsed, batches


def run(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--corpora", nargs="+", default=list(CORPORA))
    p.add_argument("--seq_len", type=int, default=2048)
    p.add_argument("--batch", type=int, default=8, help="rows per batch")
    p.add_argument("--seconds", type=float, default=5.0, help="measuring time per setting")
    p.add_argument("--cores", type=int, default=1, help="CPU cores to pin to (0: leave as is)")
    a = p.parse_args(argv)
    if a.cores:
        os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[: a.cores])
    t0 = time.perf_counter()
    tok = tokenizer.load_tokenizer(gguf.smollm2_gguf_path())
    print(
        f"SmolLM2 tokenizer loaded in {time.perf_counter() - t0:.1f} s; cores {sorted(os.sched_getaffinity(0))}; "
        f"T={a.seq_len}, B={a.batch}, {a.seconds:.0f} s per setting; load average {os.getloadavg()[0]:.1f} "
        f"on {os.cpu_count()} CPUs (other processes slow these numbers)"
    )
    print(f"{'corpus':28s} {'mode':6s} {'tokens/s':>12s} {'batches':>8s}")
    for path in a.corpora:
        name = os.path.basename(path)
        src = documents.SourceConfig("files", glob=path)
        with tempfile.TemporaryDirectory() as cache_dir:
            cfg = pipeline.DataConfig(sources=(src,), seq_len=a.seq_len, global_batch_size=a.batch, num_threads=1)
            rate, n = _throughput(cfg, tok, a.seconds)
            print(f"{name:28s} {'cold':6s} {rate:12,.0f} {n:8d}")
            docs = documents.read_documents(path)
            encoder = tokens.Encoder(tok, None, None)
            t0 = time.perf_counter()
            cache = tokens.cached_tokens(docs, encoder, cache_dir, "bench")
            n_tokens = int(cache.lengths().sum())
            print(f"{name:28s} {'cache':6s} {n_tokens / (time.perf_counter() - t0):12,.0f} {'':8s}")
            warm = pipeline.DataConfig(
                sources=(src,), seq_len=a.seq_len, global_batch_size=a.batch, num_threads=1, cache_dir=cache_dir
            )
            rate, n = _throughput(warm, tok, a.seconds)
            print(f"{name:28s} {'warm':6s} {rate:12,.0f} {n:8d}")


if __name__ == "__main__":
    run()
