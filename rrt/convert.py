"""Full-depth parameters -> (relaxed) recursive parameters, and the `python -m rrt.convert` CLI.

Shared weights. Slot k of the K shared layers is tied to the depth positions that use it (cycle: k, k+K, ...;
sequence: kR .. kR+R-1). Its initial weights come from the pretrained layers:
  stepwise  layer round(linspace(0, L-1, K))[k] (every R-th layer, first and last kept; the same rule serves
            sequence, where that layer lies in or next to slot k's own group)
  average   the mean of the layers tied to slot k
  lower     layer k;  upper  layer L-K+k
  random    a fresh initialisation (the baseline)

LoRA. Position l's residual R_l = W_l - W'_{slot(l)} ([I, O], input-first) is factored to rank r, s = alpha / r:
  svd   the truncated SVD U S V^T (float64, via the smaller Gram matrix): a = U_r ([I, r]), b = S_r V_r^T / s
        ([r, O]), so that s * a @ b is the best rank-r approximation of the WEIGHTS (Frobenius norm). In the
        paper's output-first notation this is B = U S / s, A = V^T of the transposed residual.
  asvd  (the default) the best rank-r approximation in the norm of the inputs X_l that position l's projection
        sees in the original model: minimises ||X_l (R_l - s a b)||_F. With C_l = X_l^T X_l + damping *
        mean(diag C_l) I = S S^T (S = Q L^(1/2) from C's eigendecomposition), it is the truncated SVD of S^T R_l =
        U S' V^T mapped back: a = S^(-T) U_r, b = S'_r V_r^T / s (SVD-LLM / ASVD). C_l comes from rrt.calibrate
        (q, k and v share one, gate and up share one). Damping keeps a dead input feature from giving NaN.
  zero  b = 0 (random a): the ablation in which the relaxed model starts as the strict one.
At full rank, with per-position norms and biases, the relaxed model reproduces the original exactly (svd and asvd:
any invertible S gives a b = S^(-T) S^T R = R).
"""

import argparse
import dataclasses
import json
import os
import sys
import time

import numpy as np
import threadpoolctl
from flax import nnx
from tqdm import tqdm

from rrt import lora
from rrt import model as model_lib

INITS = ("stepwise", "average", "lower", "upper", "random")
LORA_INITS = ("asvd", "svd", "zero")
DAMPING = 1e-2  # asvd: relative to the mean input second moment


@dataclasses.dataclass(frozen=True)
class Recursion:
    """How to make a recursive model out of a full-depth one."""

    loops: int = 2
    strategy: str = "cycle"
    init: str = "stepwise"
    rank_attn: int = 0
    rank_mlp: int = 0
    alpha: float = 0.0  # 0: alpha = r
    lora_init: str = "asvd"  # asvd (needs calibration moments) | svd | zero
    per_position_norms: bool | None = None  # None: on for relaxed models, off for strict ones
    seed: int = 0
    damping: float = DAMPING  # asvd: C + damping * mean(diag C) I

    @property
    def relaxed(self) -> bool:
        return self.rank_attn > 0 or self.rank_mlp > 0

    @property
    def needs_calibration(self) -> bool:
        return self.relaxed and self.lora_init == "asvd"


def recursive_config(base: model_lib.ModelConfig, rec: Recursion) -> model_lib.ModelConfig:
    """The recursive model's config; validates the recursion against the base model."""
    if rec.init not in INITS:
        raise ValueError(f"unknown init {rec.init!r}; expected one of {INITS}")
    if rec.lora_init not in LORA_INITS:
        raise ValueError(f"unknown lora_init {rec.lora_init!r}; expected one of {LORA_INITS}")
    if not rec.damping >= 0:
        raise ValueError(f"damping must be >= 0, got {rec.damping}")
    if base.n_loops != 1 or base.relaxed:
        raise ValueError("the source model must be a full-depth vanilla model (n_loops=1, rank 0)")
    if rec.loops <= 0 or base.n_layers % rec.loops:
        raise ValueError(f"the model's {base.n_layers} layers cannot be split into {rec.loops} loops (L % B != 0)")
    relaxed = rec.rank_attn > 0 or rec.rank_mlp > 0
    per_pos = relaxed if rec.per_position_norms is None else rec.per_position_norms
    return dataclasses.replace(
        base,
        n_loops=rec.loops,
        strategy=rec.strategy,
        rank_attn=rec.rank_attn,
        rank_mlp=rec.rank_mlp,
        lora_alpha=rec.alpha,
        per_position_norms=per_pos,
    )


def source_layers(cfg: model_lib.ModelConfig, init: str) -> list[list[int]]:
    """For each shared slot, the pretrained layers whose (mean) weights initialise it."""
    L, K = cfg.n_layers, cfg.n_shared
    ids = cfg.layer_ids().reshape(-1)
    if init == "stepwise":
        return [[int(i)] for i in np.round(np.linspace(0, L - 1, K)).astype(int)]
    if init == "average":
        return [[int(l) for l in np.flatnonzero(ids == k)] for k in range(K)]
    if init == "lower":
        return [[k] for k in range(K)]
    if init == "upper":
        return [[L - K + k] for k in range(K)]
    raise ValueError(f"no source layers for init {init!r}")


def full_rank(base: model_lib.ModelConfig) -> tuple[int, int]:
    """The ranks that reproduce every projection exactly: (attention, MLP)."""
    dims = base.projections()
    attn = max(min(d) for p, d in dims.items() if p in model_lib.ATTN_PROJECTIONS)
    mlp = max(min(d) for p, d in dims.items() if p not in model_lib.ATTN_PROJECTIONS)
    return attn, mlp


def truncated_svd(resid_IxO: np.ndarray, r: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(a [I, r], b [r, O], squared singular values) with a @ b the best rank-r approximation U_r S_r V_r^T of the
    residual; the singular values sit on the output side (b = S_r V_r^T), as in the paper's B = U S (for W^T).

    Computed from the Gram matrix of the smaller side in float64 (an eigh of at most min(I, O)^2), which is several
    times faster than a LAPACK SVD of the float32 matrix and, at full rank, reconstructs the residual exactly
    (a @ b = R V V^T = R)."""
    a, b, lam = _svd64(resid_IxO, r)
    return a.astype(np.float32), b.astype(np.float32), lam


def _svd64(resid_IxO: np.ndarray, r: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`truncated_svd` in float64."""
    r64 = resid_IxO.astype(np.float64)
    i, o = r64.shape
    if i <= o:
        lam, u = np.linalg.eigh(r64 @ r64.T)  # left singular vectors, ascending
        lam, u = lam[::-1], u[:, ::-1]
        a = u[:, :r]
        b = a.T @ r64  # = S_r V_r^T
    else:
        lam, v = np.linalg.eigh(r64.T @ r64)  # right singular vectors
        lam, v = lam[::-1], v[:, ::-1]
        sv = np.sqrt(np.maximum(lam[:r], 0.0))
        us = r64 @ v[:, :r]  # = U_r S_r
        a = np.divide(us, sv, out=np.zeros_like(us), where=sv > 1e-12 * max(sv.max(initial=0.0), 1e-30))
        b = sv[:, None] * v[:, :r].T
    return a, b, np.maximum(lam, 0.0)


def whitening(c_IxI: np.ndarray, damping: float) -> tuple[np.ndarray, np.ndarray]:
    """(S^T, S^(-T)), both [I, I] float64, with S S^T = C' + damping * I, C' = C / mean(diag C), from the
    eigendecomposition C' = Q L Q^T: S^T = L^(1/2) Q^T. Eigenvalues are floored at 1e-12 of the largest (and C = 0
    gives the identity), so a rank-deficient C (a dead input feature) with damping 0 still gives finite factors."""
    c = np.asarray(c_IxI, np.float64)
    c = 0.5 * (c + c.T)
    scale = float(np.mean(np.diag(c)))
    if scale > 0:  # the minimiser does not depend on C's scale; this one keeps a ~ O(1), like svd's orthonormal a,
        c = c / scale  # whatever the number of calibration tokens and the inputs' magnitude
    lam, q = np.linalg.eigh(c)
    lam = np.maximum(lam, 0.0) + damping * max(float(np.mean(np.diag(c))), 0.0)
    top = float(lam.max(initial=0.0))
    lam = np.maximum(lam, 1e-12 * top) if top > 0 else np.ones_like(lam)
    root = np.sqrt(lam)
    return root[:, None] * q.T, q / root[None, :]


def weighted_svd(resid_IxO: np.ndarray, st_IxI: np.ndarray, st_inv_IxI: np.ndarray, r: int):
    """(a [I, r], b [r, O], squared singular values of S^T R): a @ b is the best rank-r approximation of the
    residual in the norm ||S^T (.)||_F = ||X (.)||_F (see `whitening` and the module docstring)."""
    u, b, lam = _svd64(st_IxI @ resid_IxO.astype(np.float64), r)
    return (st_inv_IxI @ u).astype(np.float32), b.astype(np.float32), lam


def convert(
    base: model_lib.ModelConfig,
    params: dict[str, np.ndarray],
    rec: Recursion,
    progress: bool = True,
    moments: dict[str, np.ndarray] | None = None,
):
    """Returns (recursive config, flat params, report). `params` are the full-depth model's (float32 math);
    `moments` ({tap: [L, I, I]}, rrt.calibrate.collect_moments of the same model) is needed by asvd LoRA init."""
    cfg = recursive_config(base, rec)
    if rec.needs_calibration:
        if moments is None:
            raise ValueError(
                "lora_init='asvd' needs calibration moments of the original model (rrt.calibrate.collect_moments); "
                "or choose lora_init='svd' or 'zero'"
            )
        for proj, (din, _) in cfg.projections().items():
            tap = model_lib.tap_of(proj)
            if cfg.rank(proj) and tuple(np.shape(moments.get(tap, ()))) != (cfg.n_layers, din, din):
                raise ValueError(
                    f"calibration moments {tap!r} have shape {tuple(np.shape(moments.get(tap, ())))}, "
                    f"expected {(cfg.n_layers, din, din)} for this model"
                )
    L, K = cfg.n_layers, cfg.n_shared
    ids = cfg.layer_ids().reshape(-1)  # [L] shared slot of each position
    out: dict[str, np.ndarray] = {k: v for k, v in params.items() if not k.startswith("layers/")}
    fresh = None
    if rec.init == "random":
        fresh = model_lib.flat_params(model_lib.Decoder(cfg, rngs=nnx.Rngs(rec.seed)))
    groups = None if rec.init == "random" else source_layers(cfg, rec.init)
    vectors = set(cfg.norm_names() + cfg.bias_names())
    full = {k: np.asarray(v, np.float32) for k, v in params.items() if k.startswith("layers/")}
    shared = {}
    for name, w_LxIxO in full.items():
        leaf = name.removeprefix("layers/")
        if fresh is not None and "layers/" + leaf in fresh:
            shared[leaf] = np.asarray(fresh["layers/" + leaf])
        elif fresh is not None:  # a vector kept per position below; its shared value is never used
            shared[leaf] = w_LxIxO[:K]
        else:
            shared[leaf] = np.stack([w_LxIxO[g].mean(axis=0) for g in groups])
        if leaf in vectors and cfg.per_position_norms:
            out["relax/" + leaf] = w_LxIxO  # every position keeps its own norm / bias
        else:
            out["layers/" + leaf] = shared[leaf]

    report = {"kept_energy": {}, "lora_init": rec.lora_init}
    rng = np.random.default_rng(rec.seed)
    jobs = [p for p in cfg.projections() if cfg.rank(p) > 0]
    bar = tqdm(total=len(jobs) * L, desc=f"LoRA {rec.lora_init}", disable=not progress or not jobs, file=sys.stderr)
    # One BLAS thread: these are many small problems, and threaded BLAS collapses when the cores are shared.
    limiter = threadpoolctl.threadpool_limits(1)
    whiten = {}  # (tap, l) -> (S^T, S^-T), shared by the projections that see the same input
    for proj in jobs:
        r, s = cfg.rank(proj), cfg.lora_scale(proj)
        din, dout = cfg.projections()[proj]
        a = np.zeros((L, din, r), np.float32)
        b = np.zeros((L, r, dout), np.float32)
        kept = total = 0.0
        for l in range(L):
            resid = full["layers/" + proj][l] - shared[proj][ids[l]]
            if rec.lora_init in ("svd", "asvd"):
                if rec.lora_init == "svd":
                    a[l], b[l], sv2 = truncated_svd(resid, r)
                else:
                    tap = model_lib.tap_of(proj)
                    w = whiten.get((tap, l))
                    if w is None:
                        w = whitening(moments[tap][l], rec.damping)
                        if sum(model_lib.tap_of(p) == tap for p in jobs) > 1:  # q, k, v (gate, up) share it
                            whiten = {k: v for k, v in whiten.items() if k[0] == tap}  # one tap's live at a time
                            whiten[(tap, l)] = w
                    a[l], b[l], sv2 = weighted_svd(resid, *w, r)
                b[l] /= s
                kept += float(np.sum(sv2[:r]))
                total += float(np.sum(sv2))
            else:
                a[l] = rng.normal(0.0, 1.0 / np.sqrt(din), (din, r))
                total += float(np.sum(resid.astype(np.float64) ** 2))
            bar.update()
        out[f"relax/{proj}_a"], out[f"relax/{proj}_b"] = a, b
        report["kept_energy"][proj] = kept / total if total > 0 else 1.0
    bar.close()
    limiter.restore_original_limits()
    report["params"] = model_lib.count_params(cfg)
    expected = model_lib.param_shapes(cfg)
    assert set(out) == set(expected), sorted(set(out) ^ set(expected))
    return cfg, out, report


def expand(cfg: model_lib.ModelConfig, params: dict[str, np.ndarray]):
    """The full-depth vanilla model computing the same function: position l gets W'_{slot(l)} + s * a_l b_l and its
    norms/biases (the export path: a relaxed model as an ordinary L-layer checkpoint)."""
    ids = cfg.layer_ids().reshape(-1)
    out_cfg = dataclasses.replace(cfg, n_loops=1, rank_attn=0, rank_mlp=0, lora_alpha=0.0, per_position_norms=False)
    out = {k: v for k, v in params.items() if not k.startswith(("layers/", "relax/"))}
    for name in model_lib.param_shapes(out_cfg):
        if not name.startswith("layers/"):
            continue
        leaf = name.removeprefix("layers/")
        if "relax/" + leaf in params:  # a per-position vector
            out[name] = np.asarray(params["relax/" + leaf])
            continue
        w = np.asarray(params[name])[ids]
        if "relax/" + leaf + "_a" in params:
            a, b = params["relax/" + leaf + "_a"], params["relax/" + leaf + "_b"]
            w = np.asarray(lora.merge(w, a, b, cfg.lora_scale(leaf)))
        out[name] = w
    return out_cfg, out


# ---------------------------------------------------------------------------------------------------------------
# CLI


def _parse_rank(value: str) -> int | str:
    if value == "full":
        return "full"
    try:
        r = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"rank must be an integer or 'full', got {value!r}") from None
    if r < 0:
        raise argparse.ArgumentTypeError(f"rank must be >= 0 (0: strict recursion) or 'full', got {r}")
    return r


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="rrt.convert", description=__doc__.splitlines()[0])
    p.add_argument("--source", required=True, help="HF dir, .gguf file or rrt checkpoint dir of a full-depth model")
    p.add_argument("--out", required=True, help="output rrt model directory (must be new or hold this same conversion)")
    p.add_argument("--loops", type=int, default=None, help="B: how many times the K = L / B shared layers loop")
    p.add_argument("--strategy", choices=model_lib.STRATEGIES, default="cycle")
    p.add_argument("--init", choices=INITS, default="stepwise")
    p.add_argument("--rank", type=_parse_rank, default=0, help="LoRA rank on attention (and MLP); 0 strict; 'full'")
    p.add_argument("--rank_mlp", type=_parse_rank, default=None, help="LoRA rank on the MLP (default: --rank)")
    p.add_argument("--alpha", type=float, default=0.0, help="LoRA alpha (scale alpha / r); 0 means alpha = r")
    p.add_argument(
        "--lora_init",
        choices=LORA_INITS,
        default="asvd",
        help="asvd: best rank-r fit in the norm of each projection's inputs (calibrated; the default); svd: best "
        "fit of the weights; zero: b = 0",
    )
    p.add_argument(
        "--calib_data",
        default="",
        help="asvd: text/JSONL file(s) or glob(s), comma-separated, to calibrate on (default: the shared corpora "
        "without their held-out tails, as rrt.train reads them)",
    )
    p.add_argument("--calib_tokens", type=int, default=16384, help="asvd: calibration tokens (whole rows)")
    p.add_argument("--calib_seq_len", type=int, default=256, help="asvd: tokens per calibration row")
    p.add_argument("--calib_batch", type=int, default=8, help="asvd: rows per forward")
    p.add_argument("--damping", type=float, default=DAMPING, help="asvd: C + damping * mean(diag C) I")
    p.add_argument("--per_position_norms", choices=("auto", "true", "false"), default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--expand",
        action="store_true",
        help="instead: write the full-depth model equivalent to a (relaxed) recursive --source (merged LoRA)",
    )
    args = p.parse_args(argv)
    if args.loops is None and not args.expand:
        p.error("--loops is required")
    if args.loops is not None and args.loops < 1:
        p.error(f"--loops must be >= 1, got {args.loops}")
    for name in ("calib_tokens", "calib_seq_len", "calib_batch"):
        if getattr(args, name) <= 0:
            p.error(f"--{name} must be positive, got {getattr(args, name)}")
    if not args.damping >= 0:
        p.error(f"--damping must be >= 0, got {args.damping}")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        p.error(f"--out {args.out} is an existing file, not a directory: give a new (or empty) directory")
    return args


def recursion_from_args(base: model_lib.ModelConfig, args: argparse.Namespace) -> Recursion:
    full_attn, full_mlp = full_rank(base)
    rank_attn = full_attn if args.rank == "full" else args.rank
    rank_mlp_arg = args.rank if args.rank_mlp is None else args.rank_mlp
    rank_mlp = full_mlp if rank_mlp_arg == "full" else rank_mlp_arg
    for name, r, limit in (("--rank", rank_attn, full_attn), ("--rank_mlp", rank_mlp, full_mlp)):
        if r < 0:
            raise ValueError(f"{name}={r} is negative; a rank is >= 0 (0: strict recursion) or 'full'")
        if r > limit:
            raise ValueError(f"{name}={r} is above min(d_in, d_out) = {limit} of every projection it applies to")
    ppn = {"auto": None, "true": True, "false": False}[args.per_position_norms]
    return Recursion(
        args.loops,
        args.strategy,
        args.init,
        rank_attn,
        rank_mlp,
        args.alpha,
        args.lora_init,
        ppn,
        args.seed,
        args.damping,
    )


def _matches(pattern: str) -> bool:
    from rrt.data import documents

    try:
        return bool(documents.paths(pattern))
    except FileNotFoundError:
        return False


def calibration_sources(calib_data: str) -> list:
    """The documents asvd calibrates on: the files of `calib_data`, whole, or by default the base config's data
    sources (the shared corpora) without their held-out tails, so that held-out perplexity stays disjoint."""
    from rrt import config as config_lib
    from rrt.data import documents

    if calib_data:
        return [documents.SourceConfig(kind="files", glob=calib_data)]
    sources = [documents.SourceConfig(**s) for s in config_lib.data_sources(config_lib.get_config())]
    missing = [s.glob for s in sources if s.kind == "files" and not _matches(s.glob)]
    if missing:
        raise FileNotFoundError(
            f"asvd calibration: the default calibration corpora {missing} are missing (set RRT_SHARED_DATA); "
            "give --calib_data <text file or glob>, or choose --lora_init svd"
        )
    return sources


def main(argv=None) -> int:
    args = parse_args(argv)
    from rrt import formats
    from rrt.formats import rrt_dir

    source = formats.resolve_source(args.source)  # "smollm2" -> the packaged GGUF
    base, params = formats.load(source)
    if args.expand:
        cfg, full = expand(base, params)
        rrt_dir.save(
            args.out,
            cfg,
            full,
            tokenizer=formats.load_tokenizer(source),
            expanded_from=os.path.abspath(source),
        )
        print(f"wrote the full-depth ({cfg.n_layers}-layer) equivalent of {args.source} to {args.out}")
        return 0
    rec = recursion_from_args(base, args)
    cfg = recursive_config(base, rec)  # validate before any work
    conversion = {"source": os.path.abspath(source), "recursion": dataclasses.asdict(rec)}
    calib = None
    if rec.needs_calibration:
        from rrt import calibrate

        calib = calibrate.calibration_rows(
            calibration_sources(args.calib_data),
            formats.load_tokenizer(source),
            args.calib_tokens,
            args.calib_seq_len,
            seed=args.seed,
        )
        conversion["calibration"] = calib.record
    if rrt_dir.is_rrt_dir(args.out):
        if rrt_dir.read_meta(args.out).get("conversion") == conversion:
            print(f"{args.out} already holds this conversion; nothing to do")
            return 0
        raise FileExistsError(f"{args.out} already holds a different checkpoint; choose another --out")
    if os.path.exists(args.out) and os.listdir(args.out):
        raise FileExistsError(f"{args.out} exists and is not empty; refusing to overwrite it")
    moments, calib_seconds = None, 0.0
    if calib is not None:
        t0 = time.perf_counter()
        moments = calibrate.collect_moments(base, params, calib, batch_size=args.calib_batch)
        calib_seconds = time.perf_counter() - t0
        print(f"calibrated on {calib.record['tokens']:,} tokens in {calib_seconds:.1f} s")
    t0 = time.perf_counter()
    cfg, new_params, report = convert(base, params, rec, moments=moments)
    report["seconds"] = {"calibration": calib_seconds, "factorization": time.perf_counter() - t0}
    tok = formats.load_tokenizer(source)
    rrt_dir.save(args.out, cfg, new_params, tokenizer=tok, conversion=conversion, report=report)
    counts = report["params"]
    base_counts = model_lib.count_params(base)
    print(f"recursive model: {cfg.n_shared} shared layers x {cfg.n_loops} loops ({cfg.strategy}, {rec.init} init)")
    print(
        f"  parameters: embedding {counts['embedding']:,}  shared {counts['shared']:,}  LoRA {counts['lora']:,}"
        f"  per-position vectors {counts['position_vectors']:,}  total {counts['total']:,}"
        f"  (original {base_counts['total']:,})"
    )
    if report["kept_energy"]:
        norm = "input-weighted norm ||X R||^2" if rec.lora_init == "asvd" else "squared Frobenius norm"
        print(f"  fraction of each residual's {norm} kept by the LoRA init:")
        for proj, frac in report["kept_energy"].items():
            print(f"    {proj:5s} rank {cfg.rank(proj):5d}: {frac:.4f}")
    print(f"wrote {args.out}")
    with open(os.path.join(args.out, "conversion_report.json"), "w") as f:
        json.dump(report, f, indent=2)
    return 0


def run():
    sys.exit(main())


if __name__ == "__main__":
    run()
