"""The base config as a preset, so that `--config base` works: every field with its meaning is in rrt/config.py.

python -m rrt.train --config base --workdir runs/x --config.source=<HF dir | .gguf | rrt dir>
"""

from rrt import config


def get_config():
    return config.get_config()
