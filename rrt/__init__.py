"""rrt: Relaxed Recursive Transformers in JAX / Flax NNX."""
