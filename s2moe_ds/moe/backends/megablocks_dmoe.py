"""MegaBlocks' grouped expert computation (CUDA only), driven by our routers, expert-parallel over
DeepSpeed's groups.

Everything except the kernel call is shared with ``backend=deepspeed, ep_mode=ragged`` (tested on CPU with
2 real processes); ``tests/test_megablocks_gpu.py`` (marked ``gpu``) compares this backend with the local one
and with MegaBlocks' own dMoE experts (``ParallelDroplessMLP``, ``mlp_impl='grouped'``) fed the same routing
and weights. Where those tests have run: docs/expert-parallelism.md and docs/benchmarks.md.

What it is: the ragged (dropless, padding-free) expert parallelism of ``dispatch/ragged.py`` — MegaBlocks' own
scheme: sort by expert, exchange counts, variable-size all-to-all, grouped compute, reverse — with
the local experts computed by ``grouped_gemm.ops.gmm``, the grouped GEMM MegaBlocks' dropless MLP runs
with ``mlp_impl='grouped'``. Why not MegaBlocks' ``ParallelDroplessMLP`` module itself:

- its expert weights are its own ``[E_local * F, D]`` parameters; DeepSpeed writes per-expert checkpoint
  files and reduces expert gradients only for parameters inside a ``deepspeed.moe.layer.MoE``'s
  ``deepspeed_experts`` (elsewhere they are saved from rank 0 only and restored wrong on other
  expert-parallel ranks);
- with ``expert_parallel_group`` set it scales expert gradients by 1/ep itself, and DeepSpeed's expert
  gradient reduction already averages over the full data-parallel size: the gradients would be scaled twice.

So this backend **is** a ``deepspeed.moe.layer.MoE`` (as ``backend=deepspeed``): the engine builds the
``ep_size_{N}`` groups, reduces expert gradients once, writes one checkpoint file per global expert, and
checkpoints are interchangeable with the ``deepspeed`` backend's (same parameter names), so a run trained
here evaluates, reshards and exports on a CPU machine.
"""

from __future__ import annotations

import torch

from ...configtools import ConfigError
from ..deepspeed_adapter import DeepSpeedEPBackend
from ..experts import ExpertSpec


def check_available() -> None:
    if not torch.cuda.is_available():
        raise ConfigError(
            "config field 'model.moe.backend': 'megablocks' needs a CUDA GPU (its kernels have no "
            "CPU implementation); use backend 'local' or 'deepspeed' on this machine"
        )
    try:
        import grouped_gemm.ops  # noqa: F401
    except ImportError as e:
        raise ConfigError(
            f"backend 'megablocks' needs MegaBlocks' grouped_gemm ({e}); install it with "
            f"`pip install --no-build-isolation --no-deps -r requirements-megablocks.txt` "
            f"(see README)"
        ) from None


class MegaBlocksBackend(DeepSpeedEPBackend):
    def __init__(self, spec: ExpertSpec, ep_size: int = 1):
        check_available()
        super().__init__(spec, ep_size=ep_size, mode="ragged", kernel="gmm")
