"""The fast paths of the model-level speed work (issue 28) compute what the plain paths compute: the kernel
``auto`` picks by group size, the routers' softmax over a short last dimension, the fused AdamW, and the
single-process engine without DeepSpeed's gradient all-reduce (``benchmarks/bench_model.py`` times them)."""

import pytest
import torch

from s2moe_ds.config import load_config
from s2moe_ds.configtools import ConfigError
from s2moe_ds.moe import kernels
from s2moe_ds.moe.routers.base import softmax_last, topk_weights


@pytest.mark.parametrize("rows, expected", [(1536, "grouped_mm"), (8 * 1024, "loop")])
def test_auto_kernel_on_cpu_follows_the_group_size_and_both_give_the_same_numbers(rows, expected):
    assert kernels.resolve("auto", torch.device("cpu"), rows / 8) == expected
    assert kernels.resolve("auto", torch.device("cpu")) == "loop"  # no rows known: the in-place inference path
    torch.manual_seed(0)
    w1 = (torch.randn(8, 32, 64) * 0.1).requires_grad_()
    w2 = (torch.randn(8, 64, 32) * 0.1).requires_grad_()
    counts = torch.bincount(torch.randint(8, (rows,)), minlength=8)
    counts[5] = 0  # an expert without rows still gets a (zero) gradient
    counts[0] += rows - counts.sum()
    x, g = torch.randn(rows, 32, requires_grad=True), torch.randn(rows, 32)
    results = []
    for impl in ("auto", "loop", "grouped_mm"):
        y = kernels.run(impl, x, counts, w1, w2)
        grads = torch.autograd.grad(y, (x, w1, w2), g)
        results.append((y, *grads))
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)
    assert not results[0][2][5].any()


def test_softmax_last_is_softmax_forward_and_backward():
    torch.manual_seed(0)
    for shape in ((1536, 8), (7, 2), (5, 3, 8), (4, 100)):
        x = torch.randn(shape, requires_grad=True)
        g = torch.randn(shape)
        ours, ref = softmax_last(x), x.softmax(-1)
        torch.testing.assert_close(ours, ref, rtol=0, atol=1e-6)
        torch.testing.assert_close(torch.autograd.grad(ours, x, g)[0], torch.autograd.grad(ref, x, g)[0])
    scores = torch.randn(50, 8)
    w, ids = topk_weights(scores, 1, "prob", probs_TE=softmax_last(scores))
    torch.testing.assert_close(w, scores.softmax(-1).gather(-1, ids))


SCRIPT = """
import json, sys
from s2moe_ds.config import load_config
from s2moe_ds.train import Trainer
out = {}
for name, overrides in json.loads(sys.argv[1]).items():
    trainer = Trainer.build(load_config("configs/tiny.yaml", overrides), run_dir=False)
    out[name] = {
        "losses": [trainer.train_step(s).loss for s in range(6)],
        "allreduce": trainer.engine.enable_backward_allreduce,
        "stage": trainer.engine.zero_optimization_stage(),
        "fused": [bool(g.get("fused")) for g in trainer.engine.optimizer.param_groups],
    }
print("RESULT " + json.dumps(out))
"""


def test_fused_adamw_and_the_lone_process_engine_train_as_the_plain_ones(pydoc_dir):
    """One process: ZeRO 0 with the fused AdamW and no gradient all-reduce takes the same steps as ZeRO 2
    with torch's per-parameter loop, up to rounding."""
    import json
    import subprocess
    import sys

    data = [f"data.data_dir={pydoc_dir}"]
    runs = {
        "plain": [*data, "train.ds_config=ds_configs/zero2.json", "train.optimizer_impl=for_loop"],
        "fast": [*data, "train.ds_config=ds_configs/zero0.json"],
    }
    proc = subprocess.run([sys.executable, "-c", SCRIPT, json.dumps(runs)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))[len("RESULT ") :])
    plain, fast = got["plain"], got["fast"]
    assert fast["allreduce"] is False and fast["stage"] == 0 and all(fast["fused"])
    assert plain["allreduce"] is True and plain["stage"] == 2 and not any(plain["fused"])
    base, ours = plain["losses"], fast["losses"]
    assert max(abs(a - b) for a, b in zip(base, ours)) < 1e-5 and base[-1] < base[0]
    with pytest.raises(ConfigError, match=r"train.optimizer_impl.*'fused', 'foreach', 'for_loop'"):
        load_config("configs/tiny.yaml", ["train.optimizer_impl=apex"])
