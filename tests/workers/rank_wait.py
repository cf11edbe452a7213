"""One rank of a 2-rank job started by hand (RANK, WORLD_SIZE, MASTER_ADDR/PORT set, no torchrun), at the
tokenized-data cache: rank 0 "builds" for ever (until the test kills it -9), rank 1 waits for it.

usage: rank_wait.py DATA CACHE TIMEOUT_S   (rank 1 prints its error and exits 3, as the CLI does for a RunFault)
"""
from __future__ import annotations

import datetime
import os
import sys
import time
from pathlib import Path

import torch

from qlora_dist.config import load_config
from qlora_dist.data import corpus
from qlora_dist.errors import RunFault
from qlora_dist import dist

data, cache, timeout_s = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
torch.distributed.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
cfg = load_config(overrides=[f"data.dataset={data}", f"dist.timeout_s={timeout_s}", "model.path=tiny-llama"])
corpus._ensure_cache = lambda *_: time.sleep(600)  # a build that outlasts the test
corpus.fingerprint = lambda *_: "0" * 20  # no tokenizer to load: the wait is what is tested
try:
    corpus.cached_rows(cfg, None, dist.read_env(), cache)
except RunFault as exc:
    print(exc, file=sys.stderr, flush=True)
    os._exit(RunFault.EXIT_CODE)  # the CLI's dist.leave: no interpreter finalization with a peer gone
os._exit(0)
