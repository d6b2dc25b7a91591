"""End to end through the real `deepspeed` launcher: 2 CPU processes (gloo), ZeRO 2, TensorBoard
events read back with TensorBoard's own reader, checkpoints, evaluation, and exact resume."""

import json
import math

import pytest
from e2e import assert_ok, cli, deepspeed_train, single_train, snapshot, train_losses

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("data") / "pydoc"
    assert_ok(cli("prepare", "--config", "configs/tiny.yaml", f"data.data_dir={d}"))
    return d


COMMON = ["train.log_interval=1", "train.eval_iters=2", "train.progress=false"]
EP2 = ["model.moe.backend=deepspeed", "model.moe.ep_size=2", "model.moe.num_experts=4"]


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, data_dir):
    out = tmp_path_factory.mktemp("runs") / "full"
    proc = deepspeed_train(
        2,
        [
            f"data.data_dir={data_dir}",
            f"train.out_dir={out}",
            "train.steps=16",
            "train.save_interval=8",
            "train.eval_interval=8",
            *COMMON,
        ],
    )
    assert_ok(proc)
    return out


def test_two_process_zero2_run_writes_tensorboard_checkpoint_and_evaluates(full_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ckpt = full_run / "checkpoints"
    assert (ckpt / "latest").read_text().strip() == "step0000016"
    files = {p.name for p in (ckpt / "step0000016").iterdir()}
    assert "mp_rank_00_model_states.pt" in files
    assert {"zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"} <= files
    assert (full_run / "config.yaml").exists()

    acc = EventAccumulator(str(full_run / "tensorboard"), size_guidance={"scalars": 0, "histograms": 0, "tensors": 0})
    acc.Reload()
    tags = acc.Tags()
    needed = ["train/loss", "train/bpc", "train/lr", "train/tokens_per_sec", "train/aux_loss", "val/loss", "val/bpc"]
    for layer in (0, 1):
        needed += [
            f"moe/layer{layer}/{m}"
            for m in (
                "aux_balance",
                "aux_uncertainty",
                "load_imbalance",
                "routing_entropy",
                "gate_mean",
                "sigma1",
                "sigma2",
            )
        ]
    missing = [t for t in needed if t not in tags["scalars"]]
    assert not missing, f"missing scalars {missing}; have {tags['scalars']}"
    for tag in needed:
        values = [e.value for e in acc.Scalars(tag)]
        assert values and all(math.isfinite(v) for v in values), tag
    assert len(acc.Scalars("train/loss")) == 16
    assert acc.Scalars("train/loss")[-1].value < acc.Scalars("train/loss")[0].value
    hist = acc.Histograms("moe/layer0/tokens_per_expert")
    # each step routes 2 pathways x 8 windows x 64 tokens x 2 ranks slots, top-1
    assert hist and hist[-1].histogram_value.num == 2 * 8 * 64 * 2
    assert "config" in tags["tensors"] or "config" in str(tags)

    proc = cli("eval", str(full_run), "--json", "--max-batches", "5")
    assert_ok(proc)
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert res["step"] == 16 and math.isfinite(res["loss"]) and res["metric"] == "bpc" and res["k"] == 1
    top2 = json.loads(cli("eval", str(full_run), "--json", "--max-batches", "5", "--k", "2").stdout.splitlines()[-1])
    assert top2["inference_gflops_per_token"] > res["inference_gflops_per_token"]
    sample = cli("sample", str(full_run), "--prompt", "def ", "--tokens", "20")
    assert_ok(sample)
    assert sample.stdout.startswith("def ")


def test_interrupted_and_resumed_run_repeats_the_losses_exactly(full_run, tmp_path, data_dir):
    out = tmp_path / "resumed"
    args = [
        f"data.data_dir={data_dir}",
        f"train.out_dir={out}",
        "train.steps=16",
        "train.save_interval=8",
        "train.eval_interval=8",
        *COMMON,
    ]
    assert_ok(deepspeed_train(2, args + ["train.stop_at_step=8"]))
    assert (out / "checkpoints" / "latest").read_text().strip() == "step0000008"
    assert_ok(deepspeed_train(2, args + ["train.resume=auto"]))
    full, resumed = train_losses(full_run), train_losses(out)
    assert sorted(resumed) == list(range(1, 17))
    assert [resumed[s] for s in range(9, 17)] == [full[s] for s in range(9, 17)]  # bit-for-bit


def test_fresh_run_refuses_to_overwrite_checkpoints(full_run, data_dir):
    before = sorted(p.name for p in (full_run / "checkpoints").iterdir())
    proc = single_train([f"data.data_dir={data_dir}", f"train.out_dir={full_run}", "train.steps=2", *COMMON])
    assert proc.returncode != 0
    assert "already holds a run" in proc.stderr and "train.resume=auto" in proc.stderr
    assert sorted(p.name for p in (full_run / "checkpoints").iterdir()) == before


def test_single_process_run_and_nonfinite_loss_message(tmp_path, data_dir):
    ok = single_train(
        [
            f"data.data_dir={data_dir}",
            f"train.out_dir={tmp_path / 'one'}",
            "train.steps=3",
            "train.eval_interval=3",
            *COMMON,
        ]
    )
    assert_ok(ok)
    # non-finite losses from step 1 on (injected): ZeRO 2 skips them, then the run stops with the last good state
    nan_env = {"S2MOE_INJECT_NONFINITE_AT": ",".join(str(s) for s in range(1, 30))}
    bad = single_train(
        [
            f"data.data_dir={data_dir}",
            f"train.out_dir={tmp_path / 'nan'}",
            "train.steps=30",
            "train.max_skipped_steps=3",
            *COMMON,
        ],
        extra_env=nan_env,
    )
    assert bad.returncode == 3
    assert "4 steps in a row had a non-finite loss" in bad.stderr and "Lower train.lr" in bad.stderr
    assert (tmp_path / "nan" / "checkpoints" / "latest").read_text().strip() == "step0000005"
    assert_ok(cli("eval", str(tmp_path / "nan"), "--max-batches", "2"))  # the saved state is good: it evaluates
    # ZeRO 0 cannot skip a step: it stops at once with the same advice
    z0 = single_train(
        [
            f"data.data_dir={data_dir}",
            f"train.out_dir={tmp_path / 'nan0'}",
            "train.steps=30",
            "train.ds_config=ds_configs/zero0.json",
            *COMMON,
        ],
        extra_env=nan_env,
    )
    assert z0.returncode == 3 and "training loss is" in z0.stderr and "Lower train.lr" in z0.stderr


@pytest.mark.parametrize(
    "ds_config,extra",
    [
        ("ds_configs/zero0.json", []),
        ("ds_configs/zero1.json", ["train.grad_accum=2"]),
        ("ds_configs/zero2_offload.json", []),
        ("ds_configs/zero2_bf16.json", ["train.precision=bf16"]),
        ("ds_configs/zero0.json", EP2),
        ("ds_configs/zero1.json", EP2 + ["train.grad_accum=2"]),
        ("ds_configs/zero2_bf16.json", EP2 + ["train.precision=bf16"]),
        ("ds_configs/zero2_bf16.json", EP2 + ["train.precision=bf16", "model.moe.ep_mode=ragged"]),
    ],
    ids=[
        "zero0",
        "zero1-accum2",
        "zero2-offload",
        "zero2-bf16",
        "ep2-zero0",
        "ep2-zero1-accum2",
        "ep2-zero2-bf16",
        "ep2-ragged-zero2-bf16",
    ],
)
def test_zero_stages_precisions_and_offload_train(tmp_path, data_dir, ds_config, extra):
    out = tmp_path / "run"
    proc = deepspeed_train(
        2,
        [
            f"data.data_dir={data_dir}",
            f"train.out_dir={out}",
            "train.steps=3",
            "train.eval_interval=3",
            f"train.ds_config={ds_config}",
            *extra,
            *COMMON,
        ],
    )
    assert_ok(proc)
    losses = train_losses(out)
    assert sorted(losses) == [1, 2, 3] and all(math.isfinite(v) for v in losses.values())
    ckpt = out / "checkpoints" / "step0000003"
    assert ckpt.is_dir()
    if "model.moe.ep_size=2" in extra:  # experts sharded: one file per global expert, from both EP ranks
        files = {p.name for p in ckpt.iterdir()}
        assert {f"layer_{l}_expert_{e}_mp_rank_00_model_states.pt" for l in (0, 1) for e in range(4)} <= files


def test_checkpoint_vocabulary_mismatch_is_refused(full_run, tmp_path):
    other = tmp_path / "other"
    src = tmp_path / "t.txt"
    src.write_text("abc abc abd " * 500)
    assert_ok(cli("prepare", "data.dataset=text", f"data.source={src}", f"data.data_dir={other}"))
    proc = cli("eval", str(full_run), "--data-dir", str(other))
    assert proc.returncode == 2
    assert "different vocabulary" in proc.stderr and "data.data_dir" in proc.stderr


@pytest.fixture(scope="module")
def ep_runs(tmp_path_factory, data_dir):
    """The same model and global batch on 2 processes: experts replicated (local backend, pure data
    parallel), and experts sharded (DeepSpeed expert parallelism, ep_size=2: padded dropless and ragged)."""
    root = tmp_path_factory.mktemp("ep")
    args = [
        f"data.data_dir={data_dir}",
        "train.steps=6",
        "train.save_interval=3",
        "train.eval_interval=3",
        "model.moe.num_experts=4",
        *COMMON,
    ]
    assert_ok(deepspeed_train(2, args + [f"train.out_dir={root / 'dp'}"]))
    assert_ok(
        deepspeed_train(
            2, args + [f"train.out_dir={root / 'ep2'}", "model.moe.backend=deepspeed", "model.moe.ep_size=2"]
        )
    )
    assert_ok(
        deepspeed_train(
            2,
            args
            + [
                f"train.out_dir={root / 'ep2-ragged'}",
                "model.moe.backend=deepspeed",
                "model.moe.ep_size=2",
                "model.moe.ep_mode=ragged",
            ],
        )
    )
    return root


@pytest.mark.parametrize("run", ["ep2", "ep2-ragged"])
def test_expert_parallel_training_matches_data_parallel(ep_runs, run):
    dp, ep = train_losses(ep_runs / "dp"), train_losses(ep_runs / run)
    assert sorted(ep) == list(range(1, 7))
    for step in dp:  # same losses within float tolerance (summation order differs)
        assert ep[step] == pytest.approx(dp[step], rel=1e-4, abs=1e-5), (step, dp[step], ep[step])
    files = {p.name for p in (ep_runs / run / "checkpoints" / "step0000006").iterdir()}
    # one file per global expert and MoE layer (2 layers x 4 experts)
    assert {f"layer_{l}_expert_{e}_mp_rank_00_model_states.pt" for l in (0, 1) for e in range(4)} <= files


@pytest.mark.parametrize("run", ["ep2", "ep2-ragged"])
def test_expert_parallel_checkpoint_evaluates_in_one_process(ep_runs, run):
    a = json.loads(cli("eval", str(ep_runs / run), "--json", "--max-batches", "4").stdout.splitlines()[-1])
    b = json.loads(cli("eval", str(ep_runs / "dp"), "--json", "--max-batches", "4").stdout.splitlines()[-1])
    assert a["loss"] == pytest.approx(b["loss"], rel=1e-4)


def test_expert_parallel_resume_repeats_losses(ep_runs, tmp_path, data_dir):
    out = tmp_path / "ep2r"
    args = [
        f"data.data_dir={data_dir}",
        "train.steps=6",
        "train.save_interval=3",
        "train.eval_interval=3",
        "model.moe.num_experts=4",
        f"train.out_dir={out}",
        "model.moe.backend=deepspeed",
        "model.moe.ep_size=2",
        *COMMON,
    ]
    assert_ok(deepspeed_train(2, args + ["train.stop_at_step=3"]))
    assert_ok(deepspeed_train(2, args + ["train.resume=auto"]))
    full, resumed = train_losses(ep_runs / "ep2"), train_losses(out)
    assert [resumed[s] for s in range(4, 7)] == [full[s] for s in range(4, 7)]


def test_reshard_ep2_on_2_processes_to_ep1_on_1_process(ep_runs, tmp_path, data_dir):
    """Saved with ep=2 on 2 processes, resumed with ep=1 on 1 process (2 micro-steps: same global
    batch): model and optimizer state carry over, the losses continue as if nothing had changed."""
    out = tmp_path / "ep2to1"
    base = [
        f"data.data_dir={data_dir}",
        "train.steps=6",
        "train.save_interval=3",
        "train.eval_interval=3",
        "model.moe.num_experts=4",
        f"train.out_dir={out}",
        "model.moe.backend=deepspeed",
        *COMMON,
    ]
    assert_ok(deepspeed_train(2, base + ["model.moe.ep_size=2", "train.stop_at_step=3"]))
    proc = deepspeed_train(1, base + ["model.moe.ep_size=1", "train.grad_accum=2", "train.resume=auto"])
    assert_ok(proc)
    assert "resharded" in proc.stdout + proc.stderr
    full, resumed = train_losses(ep_runs / "ep2"), train_losses(out)
    for s in range(4, 7):
        assert resumed[s] == pytest.approx(full[s], rel=1e-4, abs=1e-5), (s, full[s], resumed[s])


def test_reshard_local_1_process_to_ep2_on_2_processes(ep_runs, tmp_path, data_dir):
    out = tmp_path / "1to2"
    base = [
        f"data.data_dir={data_dir}",
        "train.steps=6",
        "train.save_interval=3",
        "train.eval_interval=3",
        "model.moe.num_experts=4",
        f"train.out_dir={out}",
        *COMMON,
    ]
    assert_ok(deepspeed_train(1, base + ["train.grad_accum=2", "train.stop_at_step=3"]))
    assert_ok(deepspeed_train(2, base + ["model.moe.backend=deepspeed", "model.moe.ep_size=2", "train.resume=auto"]))
    full, resumed = train_losses(ep_runs / "ep2"), train_losses(out)
    for s in range(1, 7):
        assert resumed[s] == pytest.approx(full[s], rel=1e-4, abs=1e-5), (s, full[s], resumed[s])


def test_reshard_command_writes_a_native_checkpoint_of_the_new_layout(ep_runs, tmp_path, data_dir):
    """`s2moe reshard`: ep=2 on 2 processes -> ep=1 on 1 process ahead of time. The new run resumes it
    natively (no resharding at resume) and continues with the uninterrupted ep=2 run's losses."""
    src = ep_runs / "ep2" / "checkpoints" / "step0000003"
    before = snapshot(src)
    dst = tmp_path / "ep1"
    proc = cli("reshard", str(src), str(dst), "--nproc", "1", "model.moe.ep_size=1", "train.grad_accum=2")
    assert_ok(proc)
    assert "[s2moe reshard]" in proc.stdout and "'ep_size': 2" in proc.stdout and "'ep_size': 1" in proc.stdout
    assert snapshot(src) == before  # the source is untouched
    new = dst / "checkpoints" / "step0000003"
    assert (dst / "checkpoints" / "latest").read_text().strip() == "step0000003"
    layout = json.loads((new / "s2moe_portable" / "meta.json").read_text())["layout"]
    assert layout == {"world": 1, "ep_size": 1, "backend": "deepspeed", "zero_stage": 2}
    cont = deepspeed_train(
        1, [f"data.data_dir={data_dir}", f"train.out_dir={dst}", *COMMON], config=str(dst / "config.yaml")
    )
    assert_ok(cont)
    assert "resharded" not in cont.stdout + cont.stderr and "steps 3->6" in cont.stdout
    full, resumed = train_losses(ep_runs / "ep2"), train_losses(dst)
    assert sorted(resumed) == [4, 5, 6]
    for s in range(4, 7):
        assert resumed[s] == pytest.approx(full[s], rel=1e-4, abs=1e-5), (s, full[s], resumed[s])
    again = cli("reshard", str(src), str(dst))
    assert again.returncode == 2 and "already holds" in again.stderr


def test_layout_change_without_portable_copy_is_refused_and_nothing_is_lost(tmp_path, data_dir):
    """train.portable_checkpoints=false saves time and disk, and then the layout is fixed: resuming
    under another one is one clear error (which says why and what would work), the run untouched."""
    out = tmp_path / "noportable"
    base = [
        f"data.data_dir={data_dir}",
        "train.steps=4",
        "train.save_interval=2",
        "train.eval_interval=2",
        "model.moe.num_experts=4",
        f"train.out_dir={out}",
        "train.portable_checkpoints=false",
        *COMMON,
    ]
    assert_ok(single_train(base + ["train.stop_at_step=2"]))
    assert not (out / "checkpoints" / "step0000002" / "s2moe_portable").exists()
    before = snapshot(out)
    proc = deepspeed_train(2, base + ["model.moe.backend=deepspeed", "model.moe.ep_size=2", "train.resume=auto"])
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "was written with the parallel layout {'world': 1, 'ep_size': 1, 'backend': 'local'" in proc.stderr
    assert "'ep_size': 2, 'backend': 'deepspeed'" in proc.stderr and "train.portable_checkpoints=false" in proc.stderr
    assert "resume with the layout that wrote it" in proc.stderr
    tool = cli("reshard", str(out), str(tmp_path / "converted"))  # the ahead-of-time tool refuses it the same way
    assert tool.returncode == 2 and "has no s2moe_portable/" in tool.stderr and "Traceback" not in tool.stderr
    assert snapshot(out) == before


def test_export_expert_parallel_checkpoint_to_safetensors(ep_runs, tmp_path, data_dir):
    from safetensors import safe_open

    out = tmp_path / "ep2.safetensors"
    assert_ok(cli("export", str(ep_runs / "ep2"), "--out", str(out)))
    with safe_open(str(out), framework="pt") as f:
        assert tuple(f.get_tensor("blocks.0.ffn.experts.w1").shape) == (4, 64, 256)  # all 4 experts, stacked
        assert "config" in f.metadata()
    from_file = json.loads(cli("eval", str(out), "--json", "--max-batches", "4").stdout.splitlines()[-1])
    from_ckpt = json.loads(cli("eval", str(ep_runs / "ep2"), "--json", "--max-batches", "4").stdout.splitlines()[-1])
    assert from_file["loss"] == from_ckpt["loss"] and from_file["step"] == 6
    folder = tmp_path / "ep2-export"  # the self-contained folder, from the expert-parallel layout too
    assert_ok(cli("export", str(ep_runs / "ep2"), "--out", str(folder)))
    from_folder = json.loads(
        cli("eval", str(folder), "--json", "--max-batches", "4", "--data-dir", str(data_dir)).stdout.splitlines()[-1]
    )
    assert from_folder["loss"] == from_ckpt["loss"] and from_folder["step"] == 6


def test_moe_metrics_cover_every_micro_batch_and_rank(tmp_path, data_dir):
    """Expert loads summed over both micro-batches of both ranks (they were the last micro-batch's), the
    imbalance from those global counts, and the slots capacity mode dropped."""
    out = tmp_path / "m"
    proc = deepspeed_train(
        2,
        [
            f"data.data_dir={data_dir}",
            f"train.out_dir={out}",
            "train.steps=2",
            "train.grad_accum=2",
            "train.eval_interval=2",
            *EP2,
            "model.moe.ep_mode=capacity",
            "model.moe.capacity_factor=0.5",
            "model.moe.min_capacity=1",
            *COMMON,
        ],
    )
    assert_ok(proc)
    recs = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    moe = [r for r in recs if r["kind"] == "moe"]
    assert [r["step"] for r in moe] == [1, 2]
    slots = 2 * 2 * 8 * 64 * 2  # ranks x micro-batches x windows x context x (two S2MoE pathways, top-1 each)
    for r in moe:
        for layer in ("layer0", "layer1"):
            counts = r[f"{layer}/tokens_per_expert"]
            assert sum(counts) == slots
            assert r[f"{layer}/load_imbalance"] == pytest.approx(max(counts) / (sum(counts) / len(counts)), rel=1e-5)
            assert r[f"{layer}/dropped_slots"] > 0  # capacity 0.5 x the average load cannot hold them all


def test_xmoe_master_weights_stay_at_norm_one_and_a_half_under_zero2(tmp_path, data_dir):
    """ZeRO 2 keeps its own fp32 copy (partitioned over the 2 ranks here) and writes it back after each
    step: the portable checkpoint holds that copy, and its XMoE embeddings must be at norm 1.5."""
    import torch

    from s2moe_ds.checkpoint.portable import read_portable

    out = tmp_path / "x"
    assert_ok(
        deepspeed_train(
            2,
            [
                f"data.data_dir={data_dir}",
                f"train.out_dir={out}",
                "train.steps=3",
                "model.moe.router=xmoe",
                "model.moe.k=2",
                "model.moe.s2moe.enabled=false",
                "train.lr=0.5",
                "train.weight_decay=0.5",
                "train.warmup_steps=0",
                "train.eval_interval=3",
                *COMMON,
            ],
        )
    )
    state, _ = read_portable(out / "checkpoints" / "step0000003")
    for layer in (0, 1):
        norms = state[f"blocks.{layer}.ffn.router.embeddings"]["fp32"].norm(dim=-1)
        torch.testing.assert_close(norms, torch.full_like(norms, 1.5))


def test_aux_loss_free_bias_is_checkpointed_and_resumes_exactly(tmp_path, data_dir):
    import torch

    args = [
        f"data.data_dir={data_dir}",
        "train.steps=4",
        "train.eval_interval=4",
        "model.moe.router_args.bias_update_rate=0.01",
        "model.moe.router_args.balance_coef=0",
        *COMMON,
    ]
    assert_ok(single_train([*args, f"train.out_dir={tmp_path / 'straight'}"]))
    assert_ok(single_train([*args, f"train.out_dir={tmp_path / 'split'}", "train.stop_at_step=2"]))
    assert_ok(single_train([*args, f"train.out_dir={tmp_path / 'split'}", "train.resume=auto"]))
    straight, split = train_losses(tmp_path / "straight"), train_losses(tmp_path / "split")
    assert [split[s] for s in (3, 4)] == [straight[s] for s in (3, 4)]
    state = torch.load(
        tmp_path / "split" / "checkpoints" / "step0000004" / "mp_rank_00_model_states.pt", weights_only=False
    )["module"]
    assert state["blocks.0.ffn.router.selection_bias_E"].abs().sum() > 0
