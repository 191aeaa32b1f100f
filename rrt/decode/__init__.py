"""Decoding: the KV cache and static batching (`cache`), per-token early exit (`early_exit`), continuous depth-wise
batching (`depthwise`). The CLI is rrt.generate."""
