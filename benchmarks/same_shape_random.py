"""A random-weight model of the same shape as a local model folder, for timing elsewhere.

The bundled GGUF (98 MB) cannot travel to every machine a benchmark runs on (a lent GPU machine
receives at most 64 MiB and has no package index). Time depends on the shapes, not the weights,
so such a machine times a copy with the same config and tokenizer and seeded random weights:

    python benchmarks/same_shape_random.py SRC DST [--seed 0]

SRC holds ``config.json`` and the tokenizer files (e.g. a copy of the bundled model's cache
folder ``~/.cache/causalnet/smollm2-135m`` without ``model.safetensors``); DST gets the same
files and ``model.safetensors`` with the family's default initialisation. Numbers computed on
DST are not the bundled model's: use it for speed and for agreement between ways of computing,
never for findings.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("src", type=Path, help="folder with config.json and the tokenizer files")
    ap.add_argument("dst", type=Path)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    args.dst.mkdir(parents=True, exist_ok=True)
    for f in args.src.iterdir():
        if f.is_file() and f.suffix != ".safetensors" and f.name != "manifest.json":
            shutil.copy2(f, args.dst / f.name)
    torch.manual_seed(args.seed)
    config = AutoConfig.from_pretrained(args.src)
    AutoModelForCausalLM.from_config(config).save_pretrained(args.dst)
    print(f"{args.dst}: random {config.model_type}, {config.num_hidden_layers} layers")


if __name__ == "__main__":
    main()
