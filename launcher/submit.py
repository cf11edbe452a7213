"""Script form of `qlora-dist submit` (submitit launcher): the logic is in qlora_dist/launch/submit.py.

    python launcher/submit.py --preset 65b-all --nodes 2 --gpus-per-node 8 model.path=/models/llama-65b \
        train.output_dir=/shared/runs/65b
"""
import sys

from qlora_dist.cli import main

if __name__ == "__main__":
    sys.exit(main(["submit", *sys.argv[1:]]))
