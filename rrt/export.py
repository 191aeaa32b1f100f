"""Export an rrt model to a Hugging Face directory: `python -m rrt.export --source <rrt dir | workdir> --out <dir>`.

The source (an rrt model dir, a training workdir's newest checkpoint, or anything else `rrt.formats.load` reads) is
expanded to its full-depth equivalent (`rrt.convert.expand`: every depth position's merged W' + s * a @ b and its own
norms and biases) and written in the source family's config.json and tensor names (`rrt.formats.hf_export`), with
the tokenizer files, so that `transformers.AutoModelForCausalLM.from_pretrained(out)`, lm-eval's `hf` model and vLLM
load it. An existing non-empty --out is refused: an export never overwrites anything.
"""

import argparse
import json
import os
import sys

from rrt import convert
from rrt.formats import hf_export

GIB = 1 << 30


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="rrt.export", description=__doc__.splitlines()[0])
    p.add_argument(
        "--source",
        required=True,
        help="rrt model dir or training workdir, local or gs://bucket/run (also: HF dir, .gguf, smollm2)",
    )
    p.add_argument("--out", required=True, help="the Hugging Face directory to write (must be new or empty)")
    p.add_argument("--dtype", choices=tuple(hf_export.DTYPES), default="float32", help="dtype of the weights")
    p.add_argument("--max_shard_gb", type=float, default=5.0, help="split safetensors files above this size (GiB)")
    p.add_argument(
        "--max_positions",
        type=int,
        default=None,
        help="max_position_embeddings to declare (default: the source lineage's, else 2048)",
    )
    args = p.parse_args(argv)
    if args.max_shard_gb <= 0:
        p.error(f"--max_shard_gb must be positive, got {args.max_shard_gb}")
    return args


def lineage_hf_config(source: str, _depth: int = 0) -> dict | None:
    """The config.json of the Hugging Face model `source` descends from (itself, or the `conversion.source` /
    `expanded_from` of an rrt dir or workdir, followed), or None (a GGUF, a scratch model, a moved source)."""
    from rrt.formats import hf, rrt_dir

    if _depth > 8 or not source:
        return None
    if rrt_dir.is_rrt_dir(source):  # a local directory or a gs:// URL
        meta = rrt_dir.read_meta(source)
        parent = (meta.get("conversion") or {}).get("source") or meta.get("expanded_from")
        return lineage_hf_config(parent, _depth + 1) if parent else None
    if os.path.isdir(source) and os.path.isfile(os.path.join(source, hf.CONFIG)):
        return hf.read_config(source)
    return None


def export(
    source: str,
    out: str,
    dtype: str = "float32",
    max_shard_bytes: int = 5 * GIB,
    max_positions: int | None = None,
) -> list[str]:
    """Writes the Hugging Face directory `out` for `source`; returns the file names written."""
    from rrt import formats
    from rrt.formats import tokenizer as tokenizer_lib

    if os.path.exists(out) and not os.path.isdir(out):
        raise FileExistsError(f"--out {out} is an existing file; give a new (or empty) directory")
    if os.path.isdir(out) and os.listdir(out):
        raise FileExistsError(f"--out {out} exists and is not empty; refusing to overwrite it")
    source = formats.resolve_source(source)
    cfg, params = formats.load(source)
    kind = hf_export.model_type(cfg)  # an unknown family fails before any work
    full_cfg, full = convert.expand(cfg, params)
    tok = formats.load_tokenizer(source)
    formats.check_vocab(tok, full_cfg, source)
    positions = max_positions or formats.max_positions(source)
    config = hf_export.hf_config(full_cfg, dtype, positions, lineage_hf_config(source), tok.bos_id, tok.eos_id)
    os.makedirs(out, exist_ok=True)
    files = hf_export.write_weights(out, full_cfg, full, dtype, max_shard_bytes)
    files += tokenizer_lib.save_hf(tok, out, kind, config["max_position_embeddings"])
    with open(os.path.join(out, "config.json"), "w") as f:  # last: its presence marks a complete directory
        json.dump(config, f, indent=2)
    return [*files, "config.json"]


def main(argv=None) -> int:
    args = parse_args(argv)
    files = export(args.source, args.out, args.dtype, int(args.max_shard_gb * GIB), args.max_positions)
    print(f"wrote the full-depth Hugging Face checkpoint of {args.source} to {args.out}: {', '.join(files)}")
    return 0


def run():
    sys.exit(main())


if __name__ == "__main__":
    run()
