"""Process-group start-up and the DeepSpeed engine: one code path for `deepspeed`, mpirun, SLURM
and a plain single process, on CPU (gloo) or GPU (nccl)."""

from __future__ import annotations

import datetime
import json
import os
import socket
from pathlib import Path

import torch
import torch.distributed as dist

from .comm_op import prepare_comm_op
from .config import DS_CONFIG_DIR, Config, resolve_path
from .configtools import ConfigError


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_in_use(port: int) -> str:
    return (
        f"port {port} on {os.environ.get('MASTER_ADDR', '127.0.0.1')} (MASTER_PORT) is already in use: another "
        f"job or a leftover process listens on it. Unset MASTER_PORT (the launch/ scripts and a single process "
        f"then pick a free port) or set it to a free one (deepspeed --master_port N)"
    )


def check_port_free(port: int) -> None:
    """Refuse, in one line, a rendezvous port another process listens on. Without this, ranks of a second
    job could join the first job's store and die minutes later in a gloo size mismatch."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a closed socket in TIME_WAIT is no conflict
        try:
            s.bind(("", port))
        except OSError:
            raise ConfigError(port_in_use(port)) from None


def init_distributed(timeout_s: int) -> tuple[int, int]:
    """Join (or create) the process group; returns (rank, world size).

    Under a launcher (deepspeed, torchrun, SLURM with our sbatch script, mpirun via mpi4py discovery)
    the environment says who we are; a bare ``python -m s2moe_ds.train`` becomes a world of one.
    """
    import deepspeed

    if "RANK" not in os.environ and "SLURM_PROCID" in os.environ and "MASTER_ADDR" in os.environ:
        # one task per process under srun (launch/slurm.sbatch, deepspeed --launcher slurm)
        os.environ.update(
            RANK=os.environ["SLURM_PROCID"],
            WORLD_SIZE=os.environ["SLURM_NTASKS"],
            LOCAL_RANK=os.environ.get("SLURM_LOCALID", "0"),
        )
        os.environ.setdefault("MASTER_PORT", "29500")
    mpi = any(k in os.environ for k in ("OMPI_COMM_WORLD_RANK", "PMI_RANK")) and "RANK" not in os.environ
    if "RANK" not in os.environ and not mpi:
        os.environ.update(
            RANK="0",
            WORLD_SIZE="1",
            LOCAL_RANK="0",
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=os.environ.get("MASTER_PORT", str(free_port())),
        )
    timeout = datetime.timedelta(seconds=timeout_s)
    # DeepSpeed creates its data- and expert-parallel groups with new_group(), which takes torch's
    # module default (30 minutes), not the world group's timeout: set the default so every group's
    # collectives fail after train.dist_timeout_s instead of hanging on a dead or stuck peer.
    import torch.distributed.distributed_c10d as c10d

    c10d.default_pg_timeout = timeout
    if getattr(c10d, "default_pg_nccl_timeout", None) is not None:
        c10d.default_pg_nccl_timeout = timeout
    # under mpirun, DeepSpeed's mpi4py discovery sets RANK/WORLD_SIZE/LOCAL_RANK and rank 0's address;
    # the port is the one the user exported (launch/mpirun.sh passes MASTER_PORT), 29500 otherwise
    port = int(os.environ.get("MASTER_PORT", 29500))
    rank0 = os.environ.get("RANK", os.environ.get("OMPI_COMM_WORLD_RANK", os.environ.get("PMI_RANK"))) == "0"
    # not when torchrun's agent hosts the store on the port itself, nor when this process already holds it
    if rank0 and "TORCHELASTIC_RUN_ID" not in os.environ and not dist.is_initialized():
        check_port_free(port)  # rank 0 hosts the rendezvous: a busy port fails here, not in a peer's collective
    prepare_comm_op()
    try:
        deepspeed.init_distributed(auto_mpi_discovery=mpi, distributed_port=port, verbose=False, timeout=timeout)
    except RuntimeError as e:
        if "EADDRINUSE" in str(e) or "address already in use" in str(e).lower():
            raise ConfigError(port_in_use(port)) from None
        raise
    release_shm_name()
    set_cpu_threads()
    return dist.get_rank(), dist.get_world_size()


LOCAL_SIZE_VARS = ("LOCAL_SIZE", "LOCAL_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_SIZE", "SLURM_NTASKS_PER_NODE")


def set_cpu_threads():
    """On a CPU-only machine, give each of the node's ranks its share of the cores (unless
    ``OMP_NUM_THREADS`` is set); returns the thread count set, or None.

    Without this every rank starts as many intra-op threads as the machine has cores. Data parallelism
    barely notices (ranks synchronise once per step), but expert parallelism synchronises at every
    all-to-all, and the OpenMP workers of a rank waiting there keep spinning on the cores its peer is
    computing on (measured in docs/benchmarks.md, expert-parallelism table). The DeepSpeed launcher only
    sets ``OMP_NUM_THREADS`` with ``--bind_cores_to_rank``.
    """
    if "OMP_NUM_THREADS" in os.environ or torch.cuda.is_available():
        return None
    local = next((int(os.environ[k]) for k in LOCAL_SIZE_VARS if os.environ.get(k, "").isdigit()), 1)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    threads = max(1, cores // max(local, 1))
    torch.set_num_threads(threads)
    if local > 1 and (not dist.is_initialized() or dist.get_rank() == 0):
        print(
            f"[s2moe] {threads} CPU thread(s) per rank ({cores} cores / {local} ranks on this node; "
            f"set OMP_NUM_THREADS to choose)",
            flush=True,
        )
    return threads


def release_shm_name() -> None:
    """Unlink this rank's DeepSpeed CPU all-reduce buffer name from /dev/shm once every rank has mapped it.

    DeepSpeed's shared-memory comm op (CPU accelerator) creates a 66 MiB POSIX shm segment per rank,
    named ``deepspeed_allreduce_buffer_{uid}_{MASTER_ADDR}_{MASTER_PORT}_{rank}``, and never unlinks it:
    every run left them in /dev/shm (RAM) until the machine ran out of memory. Peers open the segments
    by name only inside initialisation, so after a barrier the name can go; the mappings stay valid and
    the memory is returned when the last process exits, even when it is killed.
    """
    if not dist.is_initialized():
        return
    name = (
        f"deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}_"
        f"{os.environ.get('MASTER_PORT', '')}_{dist.get_rank()}"
    )
    if dist.get_world_size() > 1:
        dist.barrier()  # every rank has finished mapping its peers' segments
    (Path("/dev/shm") / name).unlink(missing_ok=True)


def device() -> torch.device:
    from deepspeed.accelerator import get_accelerator

    acc = get_accelerator()
    if acc.device_name() == "cpu":
        return torch.device("cpu")
    return torch.device(acc.device_name(int(os.environ.get("LOCAL_RANK", 0))))


def deepspeed_config(cfg: Config) -> dict:
    """The DeepSpeed JSON config with batch size, clipping and precision filled in from our config."""
    path = resolve_path(cfg.train.ds_config, DS_CONFIG_DIR)
    if not path.exists():
        shipped = ", ".join(p.name for p in sorted(DS_CONFIG_DIR.glob("*.json")))
        raise ConfigError(
            f"config field 'train.ds_config': {cfg.train.ds_config!r} does not exist (the shipped ones, "
            f"as ds_configs/NAME or NAME: {shipped})"
        )
    try:
        ds = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"config field 'train.ds_config': {path} is not valid JSON ({e})") from None
    t = cfg.train
    stage = ds.get("zero_optimization", {}).get("stage", 0)
    if stage == 3:
        raise ConfigError(
            f"config field 'train.ds_config': {path} selects ZeRO stage 3, which DeepSpeed rejects "
            f"for MoE models; use ds_configs/zero2.json (or zero2_offload.json for CPU offload)"
        )
    ds.pop("train_batch_size", None)
    ds.update(
        train_micro_batch_size_per_gpu=t.micro_batch_size,
        gradient_accumulation_steps=t.grad_accum,
        gradient_clipping=t.grad_clip,
        steps_per_print=ds.get("steps_per_print", 10**9),
    )
    ds["bf16"] = {**ds.get("bf16", {}), "enabled": t.precision == "bf16"}
    ds["fp16"] = {**ds.get("fp16", {}), "enabled": t.precision == "fp16"}
    if ds.get("zero_optimization", {}).get("offload_optimizer"):
        ds["zero_force_ds_cpu_optimizer"] = False  # keep our torch AdamW with the optimizer on the CPU
    return ds


def build_engine(model: torch.nn.Module, cfg: Config, optimizer, lr_scheduler, ds_overrides=None):
    """``deepspeed.initialize`` with ``deepspeed_config`` (``ds_overrides`` merged in: benchmarks); DeepSpeed's
    own config validation errors become a ConfigError naming ``train.ds_config``."""
    import deepspeed

    try:
        engine, _, _, scheduler = deepspeed.initialize(
            model=model,
            optimizer=optimizer,
            lr_scheduler=lr_scheduler,
            config={**deepspeed_config(cfg), **(ds_overrides or {})},
        )
    except (ValueError, AssertionError) as e:  # DeepSpeed's config validation
        raise ConfigError(
            f"config field 'train.ds_config': DeepSpeed rejected {resolve_path(cfg.train.ds_config, DS_CONFIG_DIR)} with our "
            f"settings filled in ({type(e).__name__}: {' '.join(str(e).split())[:400]}); fix that "
            f"entry or start from ds_configs/zero2.json"
        ) from None
    from .checkpoint.deepspeed_private import skip_lone_allreduce

    skip_lone_allreduce(engine, dist.get_world_size() if dist.is_initialized() else 1)
    return engine, scheduler


class MasterWeights:
    """A parameter's fp32 value where the optimizer keeps it. Under ZeRO 1/2 (and bf16) DeepSpeed's
    optimizer owns an fp32 copy and writes it back over the module parameter after every step, so a
    change that must persist goes into that copy (DeepSpeed's public ``safe_get/set_full_fp32_param``,
    collective over the data-parallel group: every rank calls them); otherwise the parameter is the copy."""

    @staticmethod
    def get(p: torch.Tensor) -> torch.Tensor:
        from deepspeed.utils import safe_get_full_fp32_param

        value = safe_get_full_fp32_param(p)
        return p.detach().float() if value is None else value

    @staticmethod
    def set(p: torch.Tensor, value: torch.Tensor) -> None:
        from deepspeed.utils import safe_set_full_fp32_param

        safe_set_full_fp32_param(p, value)
        with torch.no_grad():
            p.copy_(value.to(p.dtype))


def broadcast_str(value: str) -> str:
    """Rank 0's ``value`` on every rank."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_reduce_mean(values: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized() and dist.get_world_size() > 1:
        values = values.clone()
        dist.all_reduce(values)
        values /= dist.get_world_size()
    return values
