"""Train the latent action quantizer (stage 1).

    deepspeed --num_gpus N launch/train_laq.py --config configs/laq/metaworld.json --run-dir runs/laq [--set k=v]

Re-running the same command on the same --run-dir resumes from its newest complete checkpoint.
"""

import sys

from lapa_dist.train.laq import LAQRunConfig, LAQTrainer
from lapa_dist.train.launcher import run_trainer

if __name__ == "__main__":
    sys.exit(run_trainer("train_laq", __doc__, LAQRunConfig, LAQTrainer))
