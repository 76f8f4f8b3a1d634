"""init_distributed from plain python: a world of one, without DeepSpeed's shared-memory all-reduce op."""

import json
import subprocess
import sys

from tests.launch_helpers import ROOT, environment

PROBE = """
import json
from deepspeed.comm import comm
from lapa_dist.parallel.distributed import init_distributed
context = init_distributed()
print(json.dumps({"rank": context.rank, "world_size": context.world_size,
                  "shm_op": comm.cdb.shm_comm_op is not None}))
"""


def test_a_world_of_one_without_the_shm_comm_op(tmp_path):
    extensions = tmp_path / "torch_extensions"  # where a JIT build of the op would land
    env = dict(environment(), TORCH_EXTENSIONS_DIR=str(extensions))
    result = subprocess.run([sys.executable, "-c", PROBE], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout.splitlines()[-1]) == {"rank": 0, "world_size": 1, "shm_op": False}
    assert not extensions.exists() or not any(extensions.iterdir())
