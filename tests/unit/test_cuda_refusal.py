"""The refusal every stage makes when Ray gives it a GPU its node cannot use (a node type that
declares GPUs it does not have, a CPU build of torch, no driver)."""

from rlhf_ray.cluster import NoCudaError, ResourcesError, no_cuda_reason, require_cuda


def test_work_given_no_gpus_or_a_working_cuda_may_run():
    assert no_cuda_reason("pretrain worker 0", [], False, "n1", None) is None
    assert no_cuda_reason("pretrain worker 0", [0], True, "n1", "12.8") is None


def test_work_given_a_gpu_without_cuda_is_refused_naming_the_node():
    reason = no_cuda_reason("PPO PolicyRole rank 1", [0, 1], False, "ff01 (10.0.0.7)", None)
    assert reason.startswith("PPO PolicyRole rank 1 was given GPU 0, 1 by Ray on node ff01 "
                             "(10.0.0.7), but that node has no usable CUDA device")
    assert "torch there is a CPU-only build" in reason
    assert "built for CUDA 12.8" in no_cuda_reason("eval", [0], False, "n", "12.8")


def test_outside_ray_nothing_is_refused_and_the_error_is_a_resources_error():
    require_cuda("a plain role in this process")  # no Ray here: a CPU run is what was asked
    assert issubclass(NoCudaError, ResourcesError)
