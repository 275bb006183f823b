"""Print the README's resource tables: each representative job's request at Qwen3 shapes (vocabulary
151,936), on CPU and with ``resources.gpu``. Usage: python bench/resource_tables.py [config.yaml]"""

from __future__ import annotations

import sys
from pathlib import Path

import yaml
from snakemake.utils import validate

from qatforge.spec.resources import ModelSize, load_table, markdown

QWEN3_SIZES = (0.6e9, 1.7e9, 4e9, 8e9)


def main(config_path: str = "config/config.yaml") -> None:
    path = Path(config_path)
    cfg = yaml.safe_load(path.read_text())
    validate(cfg, str(path.parent / "schema.yaml"))  # fills the defaults
    sizes = {f"{p / 1e9:g}B": ModelSize(int(p), 151_936, "README") for p in QWEN3_SIZES}
    print(markdown(cfg, sizes, load_table()))
    gpu_cfg = {**cfg, "resources": {**cfg["resources"], "gpu": True}}
    print(markdown(gpu_cfg, sizes, load_table(), gpu_only=True))


if __name__ == "__main__":
    main(*sys.argv[1:])
