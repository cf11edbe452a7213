"""Script form of the trainer's entry point, for launchers that want a file rather than a module:

    deepspeed --num_gpus 8 launcher/train.py train --preset 7b-all model.path=/models/llama-7b
    torchrun --nproc_per_node 8 launcher/train.py train ...

It is `python -m qlora_dist` and nothing else: every launcher ends in the same `qlora_dist.cli.main`.
"""
import sys

from qlora_dist.cli import main

if __name__ == "__main__":
    sys.exit(main())
