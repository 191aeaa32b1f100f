"""Example sweep: peak learning rate x (strict vs relaxed recursion), 3 x 2 = 6 runs of the base config.

    python launch/sweep.py launch/sweeps/example.py --base_workdir runs/sweep1 --max_parallel 2
    python launch/sweep.py launch/sweeps/example.py --base_workdir runs/sweep1 --dry-run   # print the 6 commands

Each run lands in runs/sweep1/<its overrides>, e.g. runs/sweep1/lr=0.0003,rank_attn=64,rank_mlp=64; rerun
the same command to resume all of them.
"""

from launch import sweep

CONFIG = "rrt/config.py"


def get_sweep() -> list[dict]:
    return sweep.product(
        sweep.grid(optim__lr=[1e-4, 3e-4, 1e-3]),
        # Paired, not crossed: strict recursion (no LoRA) and rank-64 relaxed recursion.
        sweep.zip_(recursion__rank_attn=[0, 64], recursion__rank_mlp=[0, 64]),
    )
