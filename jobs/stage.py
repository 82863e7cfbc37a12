"""One stage as a Ray job (a name of rlhf_ray/run.py's STAGES; --help lists them).

    ray job submit --address http://<head>:8265 --runtime-env jobs/runtime_env.yaml \
        -- python jobs/stage.py sft --config configs/gpu-qwen.yaml

The stages it needs first must be done already in the run folder (or be configured to start from
`model.pretrained`); a finished stage is skipped, an interrupted one resumes from its checkpoint.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from jobs.submit import run_job  # noqa: E402

if __name__ == "__main__":
    run_job(sys.argv[1:], __doc__.splitlines()[0], stage=True)
