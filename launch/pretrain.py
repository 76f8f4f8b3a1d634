"""Latent pretraining of the VLA (stage 2): predict each frame's latent action from image + instruction.

    deepspeed --num_gpus N launch/pretrain.py --config configs/openx.json --run-dir runs/vla [--set k=v]

Multi-node: ``deepspeed --hostfile launch/hostfile.example ...`` or launch/slurm.sbatch (see README).
Re-running the same command on the same --run-dir resumes from its newest complete checkpoint.
"""

import sys

from lapa_dist.train.vla import run_stage

if __name__ == "__main__":
    sys.exit(run_stage("pretrain", __doc__))
