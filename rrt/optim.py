"""The optax chain: schedule, clipping, AdamW with a decay mask, per-group learning rates, freezing.

Parameter groups (by flat name): `lora` (relax/*_a, relax/*_b), `embed` (embed, head) and `shared` (everything else:
the shared block, per-position norms/biases, the final norm). Frozen groups get `set_to_zero` and no optimizer
state. No weight decay on norms and biases (any name containing "norm" or ending in "_bias").
"""

import dataclasses
import math

import jax
import optax

SCHEDULES = ("cosine", "wsd", "constant")


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    lr: float = 3e-4  # peak learning rate of the shared weights
    lora_lr: float | None = None  # peak learning rate of the LoRA factors (None: lr)
    schedule: str = "cosine"  # cosine (warmup + cosine) | wsd (warmup-stable-decay) | constant (after warmup)
    warmup_steps: int = 100
    total_steps: int = 1000
    decay_fraction: float = 0.1  # wsd: the last fraction of steps decays linearly to min_lr_ratio
    min_lr_ratio: float = 0.1  # final lr = min_lr_ratio * peak
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    clip_norm: float = 1.0  # global-norm clipping (0: off)
    freeze_shared: bool = False  # train only the LoRA factors (and per-position vectors stay frozen too)
    freeze_embeddings: bool = False

    def __post_init__(self):
        def need(name: str, ok, what: str):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not ok(v):
                raise ValueError(f"optim.{name} must be {what}, got {v!r}")

        need("lr", lambda v: v > 0, "a finite number > 0")
        if self.lora_lr is not None:
            need("lora_lr", lambda v: v > 0, "a finite number > 0 (or unset: lr)")
        need("min_lr_ratio", lambda v: 0 <= v <= 1, "in [0, 1]")
        need("b1", lambda v: 0 <= v < 1, "in [0, 1)")
        need("b2", lambda v: 0 <= v < 1, "in [0, 1)")
        need("eps", lambda v: v > 0, "a finite number > 0")
        need("weight_decay", lambda v: v >= 0, "a finite number >= 0")
        need("clip_norm", lambda v: v >= 0, "a finite number >= 0 (0: off)")
        need("decay_fraction", lambda v: True, "a finite number")
        for name in ("warmup_steps", "total_steps"):
            if isinstance(getattr(self, name), bool) or not isinstance(getattr(self, name), int):
                raise ValueError(f"optim.{name} must be an integer, got {getattr(self, name)!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"OptimConfig: unknown schedule {self.schedule!r}; expected one of {SCHEDULES}")
        if self.total_steps <= 0 or self.warmup_steps < 0 or self.warmup_steps > self.total_steps:
            raise ValueError(
                f"OptimConfig: need 0 <= warmup_steps <= total_steps, total_steps > 0 "
                f"(got {self.warmup_steps}, {self.total_steps})"
            )
        if not 0 < self.decay_fraction <= 1:
            raise ValueError(f"OptimConfig: decay_fraction must be in (0, 1], got {self.decay_fraction}")


def schedule(cfg: OptimConfig, peak: float) -> optax.Schedule:
    end = peak * cfg.min_lr_ratio
    if cfg.schedule == "cosine":
        # optax needs decay steps > warmup steps; warmup_steps == total_steps is valid here (all warmup)
        decay_steps = max(cfg.total_steps, cfg.warmup_steps + 1)
        return optax.warmup_cosine_decay_schedule(0.0, peak, cfg.warmup_steps, decay_steps, end)
    warmup = optax.linear_schedule(0.0, peak, max(cfg.warmup_steps, 1))
    if cfg.schedule == "constant":
        return optax.join_schedules([warmup, optax.constant_schedule(peak)], [cfg.warmup_steps])
    decay_steps = max(int(cfg.total_steps * cfg.decay_fraction), 1)
    stable = cfg.total_steps - decay_steps - cfg.warmup_steps
    if stable < 0:
        raise ValueError("OptimConfig: warmup_steps + decay steps exceed total_steps")
    parts = [warmup, optax.constant_schedule(peak), optax.linear_schedule(peak, end, decay_steps)]
    return optax.join_schedules(parts, [cfg.warmup_steps, cfg.warmup_steps + stable])


def group(name: str) -> str:
    if name.startswith("relax/") and name.endswith(("_a", "_b")):
        return "lora"
    if name in ("embed", "head"):
        return "embed"
    return "shared"


def _labels(params: dict, cfg: OptimConfig) -> dict:
    frozen = {"shared": cfg.freeze_shared, "embed": cfg.freeze_embeddings, "lora": False}

    def label(path, _):
        g = group("/".join(k.key for k in path))
        return "frozen" if frozen[g] else g

    return jax.tree_util.tree_map_with_path(label, params)


def _decay_mask(params: dict) -> dict:
    def decays(path, _):
        name = "/".join(k.key for k in path)
        return "norm" not in name and not name.endswith("_bias")

    return jax.tree_util.tree_map_with_path(decays, params)


def make(cfg: OptimConfig, params: dict) -> tuple[optax.GradientTransformation, dict]:
    """(optimizer, {group: schedule}) for a nested parameter dict."""
    schedules = {
        "shared": schedule(cfg, cfg.lr),
        "embed": schedule(cfg, cfg.lr),
        "lora": schedule(cfg, cfg.lora_lr if cfg.lora_lr is not None else cfg.lr),
    }

    def adamw(sched):
        return optax.adamw(sched, cfg.b1, cfg.b2, cfg.eps, weight_decay=cfg.weight_decay, mask=_decay_mask)

    transforms = {g: adamw(s) for g, s in schedules.items()}
    transforms["frozen"] = optax.set_to_zero()
    chain = [optax.clip_by_global_norm(cfg.clip_norm)] if cfg.clip_norm > 0 else []
    chain.append(optax.multi_transform(transforms, lambda p: _labels(p, cfg)))
    return optax.chain(*chain), schedules
