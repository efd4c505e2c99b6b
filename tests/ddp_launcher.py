"""Run by tests/test_train.py under torchrun: train.py's training as the command line would run it,
then each rank saves its own adapters to RANKS_DIR/rank<N>.safetensors, so the test can check that
the ranks end identical. Usage: ddp_launcher.py RANKS_DIR [train.py flags ...]"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch.distributed as dist  # noqa: E402

import simda  # noqa: E402
import train  # noqa: E402

ranks, argv = sys.argv[1], sys.argv[2:]
run = train.train(train.build_parser().parse_args(argv))
os.makedirs(ranks, exist_ok=True)
simda.save_adapters(run.pipe.unet, os.path.join(ranks, f"rank{run.rank}.safetensors"))
dist.destroy_process_group()
