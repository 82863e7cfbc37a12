"""The whole pipeline as a Ray job: every stage in order, or up to --until STAGE.

    ray job submit --address http://<head>:8265 --runtime-env jobs/runtime_env.yaml \
        -- python jobs/pipeline.py --config configs/gpu-qwen.yaml [--until ppo] [--set key=value ...]

It joins the cluster it was submitted to and writes to the config's run folder (an absolute path,
shared by every node). Submitting it again resumes: finished stages are skipped, an interrupted
one continues from its last checkpoint.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # `jobs` and `rlhf_ray` import

from jobs.submit import run_job  # noqa: E402

if __name__ == "__main__":
    run_job(sys.argv[1:], __doc__.splitlines()[0])
