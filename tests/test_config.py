"""Config loading, overrides and validation errors that name the field and the valid values."""

import pytest

from s2moe_ds.config import CONFIG_DIR, Config, load_config, validate
from s2moe_ds.configtools import ConfigError
from s2moe_ds.distributed import deepspeed_config


def test_tiny_config_loads_with_overrides():
    cfg = load_config(
        CONFIG_DIR / "tiny.yaml",
        [
            "train.steps=7",
            "model.moe.router=xmoe",
            "model.moe.router_args.balance_temperature=0.5",
            "model.moe_layers=[1]",
        ],
    )
    assert cfg.train.steps == 7 and cfg.model.moe.router == "xmoe"
    assert cfg.model.moe.router_args == {"balance_temperature": 0.5}
    assert cfg.model.moe_layer_ids() == [1]
    assert cfg.model.moe.s2moe.enabled is True  # from the file


@pytest.mark.parametrize("path", sorted(CONFIG_DIR.glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_validates(path):
    assert isinstance(load_config(path), Config)


BAD = [
    (["train.stpes=5"], ["train.stpes", "did you mean 'steps'"]),
    (["model.moe.k=9"], ["model.moe.k", "num_experts (8)"]),
    (["model.moe.router=topk"], ["model.moe.router", "smoe", "xmoe", "stablemoe", "competesmoe", "vqmoe"]),
    (
        ["model.moe.router=xmoe", "model.moe.router_args.balance_temperature=0"],
        ["model.moe.router_args.balance_temperature", "> 0"],
    ),
    (["model.moe.router_args.temprature=0.3"], ["temprature", "valid keys", "z_loss_coef"]),
    (["train.lr=fast"], ["train.lr", "expected a number"]),
    (["train.steps=1.5"], ["train.steps", "expected an integer"]),
    (["model.d_model=130"], ["model.d_model", "divisible by model.n_head"]),
    (["model.moe.s2moe.noise=uniform"], ["model.moe.s2moe.noise", "fixed", "learnable"]),
    (["model.moe.s2moe.temperature=-1"], ["model.moe.s2moe.temperature"]),
    (["model.moe.s2moe.sigma1=-0.1"], ["model.moe.s2moe.sigma1"]),
    (["model.moe_layers=[0, 9]"], ["model.moe_layers", "[0, 4)"]),
    (["train.precision=fp8"], ["train.precision", "bf16"]),
    (["data.dataset=imagenet"], ["data.dataset", "text8"]),
    (["model.moe.backend=tutel"], ["model.moe.backend", "local"]),
    (["model.moe.ep_mode=padded"], ["model.moe.ep_mode", "dropless", "capacity", "ragged"]),
    (
        ["model.moe.backend=deepspeed", "model.moe.ep_mode=ragged", "model.moe.backend_impl=padded_bmm"],
        ["model.moe.backend_impl", "'padded_bmm'", "auto, loop or grouped_mm"],
    ),
    (["model.moe.router=competesmoe", "model.moe.router_args.compete_prob=2"], ["compete_prob", "[0.0, 1.0]"]),
    (["trainsteps"], ["section.field=value"]),
]


@pytest.mark.parametrize("overrides,needles", BAD, ids=[b[0][-1] for b in BAD])
def test_bad_config_names_field_and_valid_values(overrides, needles):
    with pytest.raises(ConfigError) as e:
        load_config(None, overrides)
    for needle in needles:
        assert needle in str(e.value)


def test_world_size_rule_is_checked_by_the_one_validator():
    """ep_size must divide the world size: refused by ``validate`` once the world size is known (the
    trainer calls it right after the process group starts), with the field, both values and the fix."""
    cfg = load_config(None, ["model.moe.backend=deepspeed", "model.moe.ep_size=2"])  # no world size yet
    assert validate(cfg, world_size=4) is cfg
    with pytest.raises(ConfigError) as e:
        validate(cfg, world_size=3)
    assert str(e.value) == (
        "config field 'model.moe.ep_size': the world size (3) must be a multiple of ep_size (2); "
        "launch 2 x N processes or lower ep_size"
    )


def test_config_is_validated_once_at_load_not_per_model_or_layer(monkeypatch):
    from s2moe_ds.model import MoELanguageModel
    from s2moe_ds.moe.layer import MoEConfig

    calls = []
    original = MoEConfig.validate
    monkeypatch.setattr(MoEConfig, "validate", lambda self, *a, **kw: calls.append(1) or original(self, *a, **kw))
    cfg = load_config(None, ["model.vocab_size=32", "model.n_layer=4", "model.d_model=16", "model.n_head=2"])
    MoELanguageModel(cfg.model)
    assert len(calls) == 1


def test_missing_and_malformed_config_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_zero3_is_rejected_with_a_pointer(tmp_path):
    ds = tmp_path / "z3.json"
    ds.write_text('{"zero_optimization": {"stage": 3}}')
    cfg = load_config(None, [f"train.ds_config={ds}"])
    with pytest.raises(ConfigError, match="ZeRO stage 3.*zero2.json"):
        deepspeed_config(cfg)


def test_deepspeed_config_filled_from_ours():
    cfg = load_config(
        None,
        [
            "train.micro_batch_size=3",
            "train.grad_accum=2",
            "train.precision=bf16",
            "train.ds_config=ds_configs/zero2_offload.json",
        ],
    )
    ds = deepspeed_config(cfg)
    assert ds["train_micro_batch_size_per_gpu"] == 3 and ds["gradient_accumulation_steps"] == 2
    assert ds["bf16"]["enabled"] and not ds["fp16"]["enabled"]
    assert ds["zero_optimization"]["offload_optimizer"]["device"] == "cpu"


def test_lr_schedules_by_hand():
    from s2moe_ds.schedule import lr_at

    t = load_config(None, ["train.steps=100", "train.warmup_steps=10", "train.lr=1.0", "train.min_lr=0.1"]).train
    assert [lr_at(s, t) for s in (0, 4, 9)] == pytest.approx([0.1, 0.5, 1.0])  # warm-up, every schedule
    assert (
        lr_at(10, t) == pytest.approx(1.0)
        and lr_at(55, t) == pytest.approx(0.55)
        and lr_at(100, t) == pytest.approx(0.1)
    )
    t.lr_schedule = "linear"
    assert lr_at(32, t) == pytest.approx(1.0 - 0.9 * 22 / 90) and lr_at(100, t) == pytest.approx(0.1)
    t.lr_schedule, t.decay_fraction = "wsd", 0.2  # stable until step 80, then linear to min_lr at 100
    assert lr_at(50, t) == lr_at(79, t) == pytest.approx(1.0)
    assert lr_at(90, t) == pytest.approx(0.55) and lr_at(100, t) == pytest.approx(0.1)
    with pytest.raises(ConfigError, match="train.lr_schedule"):
        load_config(None, ["train.lr_schedule=step"])
