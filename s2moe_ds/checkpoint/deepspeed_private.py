"""Every call into DeepSpeed internals, in one place: written against DeepSpeed 0.19.8.

The portable checkpoint copy (``portable.py``) reads and writes the fp32 master weights and Adam moments
each rank's ZeRO optimizer owns, which DeepSpeed's public API offers only as collective gathers. What it
relies on here, none of it a public interface, so check each when DeepSpeed is upgraded
(``tests/test_portable_checkpoint.py`` compares the result with DeepSpeed's own public gather):

- ``engine.optimizer.optimizer``: the torch optimizer inside a ZeRO optimizer, and its ``state``;
- ``param._hp_mapping`` (ZeRO 1/2): the fragment of a flattened parameter this rank's partition holds
  (``lp_fragment_address``, ``get_hp_fragment(key)``); absent without ZeRO partitioning;
- ``optimizer._link_all_hp_params()``, ``_hp_optimizer_states_linked``,
  ``_lazy_init_hp_params_optimizer_state()``: (re)linking those fragments to the optimizer state;
- ``deepspeed.utils.groups._get_expert_data_parallel_rank(group_name)``;
- ``engine.enable_backward_allreduce`` (``skip_lone_allreduce``);
- ``deepspeed.comm.torch.build_shm_op``, which ``TorchBackend.__init__`` calls (``skip_shm_comm_op``).
"""

from __future__ import annotations

import torch

MOMENTS = ("exp_avg", "exp_avg_sq")  # torch Adam's state, as ZeRO keeps it per parameter


def inner_optimizer(engine):
    """The torch optimizer (a ZeRO optimizer wraps it as ``.optimizer``)."""
    opt = engine.optimizer
    return getattr(opt, "optimizer", opt)


def adam_step(engine) -> int:
    """The optimizer's step count (0 before the first step)."""
    for state in inner_optimizer(engine).state.values():
        if "step" in state:
            return int(state["step"])
    return 0


def moment(engine, p, key: str) -> torch.Tensor:
    """Adam moment ``key`` of a parameter that is not ZeRO-partitioned, fp32 on the CPU."""
    return inner_optimizer(engine).state[p][key].detach().float().cpu()


def set_moment(engine, p, key: str, value: torch.Tensor) -> None:
    """Adam moment ``key`` of a parameter that is not ZeRO-partitioned."""
    inner_optimizer(engine).state[p][key].copy_(value)


def is_partitioned(p) -> bool:
    """Whether a ZeRO 1/2 optimizer holds ``p``'s fp32 master weights in partitions."""
    return hasattr(p, "_hp_mapping")


def owned_fragment(p):
    """``(offset, {"fp32", "exp_avg", "exp_avg_sq"})`` for the slice of flattened ``p`` this rank's ZeRO
    partition holds; ``()`` if it holds none of it; None if ``p`` is not ZeRO-partitioned (stage 0)."""
    if not is_partitioned(p):
        return None
    m = p._hp_mapping
    if m is None:
        return ()
    values = {"fp32": m.get_hp_fragment()} | {k: m.get_hp_fragment(k) for k in MOMENTS}
    return m.lp_fragment_address.start, {k: v.detach().float().cpu().flatten() for k, v in values.items()}


def relink(engine) -> None:
    """ZeRO 1/2 map each parameter to its optimizer-state fragments when linking; torch creates Adam
    state lazily at the first step, after DeepSpeed linked, so link again before reading or writing it."""
    opt = engine.optimizer
    if hasattr(opt, "_link_all_hp_params"):
        opt._link_all_hp_params()
        opt._hp_optimizer_states_linked = False
        opt._lazy_init_hp_params_optimizer_state()


def ensure_state(engine, step: int) -> None:
    """Give every optimizer tensor Adam state (created lazily by torch) and the saved step count."""
    opt = inner_optimizer(engine)
    for group in opt.param_groups:
        for p in group["params"]:
            st = opt.state[p]
            for k in MOMENTS:
                if k not in st:
                    st[k] = torch.zeros_like(p, dtype=torch.float32)
            st["step"] = torch.tensor(float(step)) if not isinstance(st.get("step"), int) else step


def expert_data_parallel_rank(group_name: str) -> int:
    """This rank's index in the expert-data-parallel group of the experts in ``group_name``."""
    from deepspeed.utils import groups

    return groups._get_expert_data_parallel_rank(group_name)


def skip_lone_allreduce(engine, world_size: int) -> bool:
    """One process without ZeRO partitioning: nothing to reduce, but DeepSpeed's engine still flattens every
    gradient into buckets, all-reduces them over a group of one and copies them back after each backward
    (about a tenth of a small MoE model's CPU step). Turn that path off; returns whether it did."""
    if world_size != 1 or engine.zero_optimization_stage() != 0:
        return False
    engine.enable_backward_allreduce = False
    return True


def skip_shm_comm_op() -> None:
    """A process group of one: DeepSpeed's CPU backend still builds (or waits for, or loads) its shared-memory
    comm op when the group starts, though there is no peer to share memory with. Have its builder return
    None, DeepSpeed's own answer where the op is unavailable: the collectives then go through torch.distributed."""
    import importlib

    # importlib, not `import deepspeed.comm.torch as m`: that reads the attribute `torch` of deepspeed.comm,
    # which is the torch package itself
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
