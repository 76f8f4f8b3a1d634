"""Action finetuning of the VLA (stage 3): a new action head on labelled trajectories.

    deepspeed --num_gpus N launch/finetune.py --config configs/vla/metaworld_finetune.json --run-dir runs/ft

``init.run`` names the pretraining run to start from (LAPA); without it the backbone starts from
``init.backbone`` (SCRATCH). Finetuning on the true actions of the pretraining videos gives ACTIONVLA.
Re-running the same command on the same --run-dir resumes.
"""

import sys

from lapa_dist.train.vla import run_stage

if __name__ == "__main__":
    sys.exit(run_stage("finetune", __doc__))
