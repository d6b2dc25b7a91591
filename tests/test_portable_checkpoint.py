"""The portable checkpoint copy (s2moe_ds/checkpoint/portable.py) written without collectives: every rank saves the
ZeRO fragments it owns; reading them back assembles exactly the full fp32 weights and Adam moments that
DeepSpeed's own (collective) gather returns, for shared and expert parameters, on 2 real processes."""

import pytest
import torch
from dist_harness import run_distributed

REPO = __import__("pathlib").Path(__file__).resolve().parents[1]


def _portable_equals_gather(rank, world, out_dir, zero_stage, backend, ep_size):
    import json

    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    from s2moe_ds.checkpoint.portable import MOMENTS, ParallelLayout, portable_keys, read_portable, save_portable
    from s2moe_ds.config import load_config
    from s2moe_ds.distributed import build_engine
    from s2moe_ds.model import MoELanguageModel
    from s2moe_ds.train.optim import build_optimizer

    cfg = load_config(
        REPO / "configs/tiny.yaml",
        [
            f"model.moe.backend={backend}",
            f"model.moe.ep_size={ep_size}",
            "model.vocab_size=40",
            f"train.ds_config=ds_configs/zero{zero_stage}.json",
        ],
    )
    torch.manual_seed(0)
    model = MoELanguageModel(cfg.model)
    engine, _ = build_engine(model, cfg, *build_optimizer(model, cfg))
    g = torch.Generator().manual_seed(rank)
    x = torch.randint(40, (2, 64), generator=g)
    out = engine(x, x)
    engine.backward(out.loss + out.aux_loss)
    engine.step()
    ckpt = __import__("pathlib").Path(out_dir)
    save_portable(engine, model, ckpt, ParallelLayout(world, ep_size, backend, zero_stage))
    torch.distributed.barrier()
    merged, meta = read_portable(ckpt)
    checked = 0
    for _name, p, keys in portable_keys(model):
        full = {"fp32": safe_get_full_fp32_param(p)} | {k: safe_get_full_optimizer_state(p, k) for k in MOMENTS}
        for key, index in keys:
            for k, v in full.items():
                torch.testing.assert_close(merged[key][k], v if index is None else v[index], rtol=0, atol=0)
            checked += 1
    assert json.loads((ckpt / "s2moe_portable" / "meta.json").read_text())["adam_step"] == meta["adam_step"] == 1
    mine = torch.load(ckpt / "s2moe_portable" / f"rank{rank:05d}.pt", weights_only=True)
    return {
        "checked": checked,
        "keys": len(merged),
        "fragments": sum("frags" in e for e in mine.values()),
        "mine": sorted(mine),
    }


@pytest.mark.parametrize(
    "zero_stage,backend,ep_size",
    [(2, "local", 1), (1, "local", 1), (2, "deepspeed", 2)],
    ids=["zero2-local", "zero1-local", "zero2-ep2"],
)
def test_portable_fragments_assemble_to_the_full_state(tmp_path, zero_stage, backend, ep_size):
    res = run_distributed(_portable_equals_gather, 2, timeout=240, args=(str(tmp_path), zero_stage, backend, ep_size))
    # every key of the model is in the merged state; each rank checked all of its parameters' keys
    assert res[0]["keys"] == res[1]["keys"] and res[0]["checked"] > 0
    # ZeRO 1/2: every rank writes fragments, and between them they cover keys neither holds whole
    assert res[0]["fragments"] > 0 and res[1]["fragments"] > 0
    assert set(res[0]["mine"]) & set(res[1]["mine"]), "some tensor should be split across the two ranks"
    files = sorted(p.name for p in (tmp_path / "s2moe_portable").glob("rank*.pt"))
    assert files == ["rank00000.pt", "rank00001.pt"]
