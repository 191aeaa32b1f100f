"""Presets: `get_config()` files holding only their deltas from rrt/config.py. Installed with rrt as `rrt.presets`;
`--config <name>` finds them from any directory (rrt.config.preset_path)."""
