"""A checkpoint as weights anyone can load: the consolidated state dict (every expert, the local
backend's layout) for evaluation, one ``.safetensors`` file, or a self-contained folder in the Hugging
Face layout, and loading that folder back anywhere.

    s2moe export runs/tiny --out tiny-export          # any parallel layout; nothing else needed afterwards
    s2moe sample tiny-export --prompt "def "           # from any directory
    s2moe eval tiny-export --text some.txt             # or --data-dir a prepared folder

    from s2moe_ds import load_pretrained
    model, tok = load_pretrained("tiny-export")
    print(tok.decode(model.generate(tok.encode("def "), 50)[0]))

The folder holds ``config.json`` (``model_type: s2moe``, the usual size names and this package's full
resolved model config under ``s2moe``), the weights as ``model.safetensors`` (keys prefixed ``model.``, as
the ``transformers`` wrapper in ``s2moe_ds/hf.py`` names them; above ``max_shard_bytes`` split into
``model-0000i-of-0000n.safetensors`` with ``model.safetensors.index.json``, as ``save_pretrained`` does),
the tokenizer (``Tokenizer.save_pretrained``: the character vocabulary, or the SentencePiece / Hugging Face
tokenizer file), and ``configuration_s2moe.py`` / ``modeling_s2moe.py`` for ``transformers``'
``trust_remote_code``. It is written to a temporary folder and renamed, so an interrupted export leaves
nothing half-written; an existing folder is never overwritten.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import torch

from ..config import config_from_dict, model_config_from_dict
from ..configtools import ConfigError
from ..moe.backends import DS_LAYOUT_BACKENDS
from ..moe.global_names import from_per_expert_file, to_stacked
from .resume import check_compatible, vocab_fingerprint
from .store import CheckpointError, find_checkpoint, model_state_file, read_state_file, verify_checkpoint

CONFIG = "config.json"
STOCK_CONFIG = "s2moe_config.json"  # a stock export: our config.json (the model's full config) under this name
EXTRA = "s2moe_extra.safetensors"  # a stock export: our parameters the stock model has no place for
FORMATS = ("auto", "stock", "s2moe")
WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"
PREFIX = "model."
CODE = {
    "configuration_s2moe.py": "from s2moe_ds.hf import S2MoEConfig  # noqa: F401  (pip install s2moe_ds[hf])\n",
    "modeling_s2moe.py": "from s2moe_ds.hf import S2MoEConfig, S2MoEForCausalLM  # noqa: F401\n",
}


def is_export(path: str | Path) -> bool:
    """An ``s2moe export`` folder: our own architecture (config.json's model_type 's2moe') or a stock one
    (``s2moe_config.json`` beside the stock config.json)."""
    if (Path(path) / STOCK_CONFIG).is_file():
        return True
    f = Path(path) / CONFIG
    if not f.is_file():
        return False
    try:
        return json.loads(f.read_text()).get("model_type") == "s2moe"
    except (OSError, ValueError):
        return False


def export_config(folder: str | Path) -> dict:
    """Our config.json of an export folder (a stock export keeps it as ``s2moe_config.json``)."""
    folder = Path(folder)
    return json.loads((folder / (STOCK_CONFIG if (folder / STOCK_CONFIG).is_file() else CONFIG)).read_text())


def consolidated_state(ckpt_dir: Path, model_cfg: dict) -> dict:
    """The model's full state dict in the *local* backend's layout (experts stacked ``[E, ...]``),
    whatever expert-parallel layout wrote the checkpoint: DeepSpeed keeps expert weights out of
    ``mp_rank_00_model_states.pt`` and writes ``layer_{L}_expert_{e}_..._model_states.pt`` per global expert,
    read under the experts' global names and stacked (``s2moe_ds/moe/global_names.py``)."""
    state = dict(read_state_file(model_state_file(ckpt_dir))["module"])
    moe = model_cfg["moe"]
    if moe.get("backend", "local") not in DS_LAYOUT_BACKENDS:
        return state
    n_layer = model_cfg["n_layer"]
    layers = model_cfg["moe_layers"]
    ids = (
        sorted(layers)
        if isinstance(layers, list)
        else {"all": list(range(n_layer)), "every_other": list(range(1, n_layer, 2)), "none": []}[layers]
    )
    for moe_layer_id, block in enumerate(ids):
        experts = {}  # this layer's experts under their global names (w1#e), one DeepSpeed file each
        for e in range(moe["num_experts"]):
            f = ckpt_dir / f"layer_{moe_layer_id}_expert_{e}_mp_rank_00_model_states.pt"
            try:
                experts.update(from_per_expert_file(read_state_file(f), e))
            except KeyError as key:
                raise CheckpointError(f"{f}: unexpected key {key}") from None
        prefix = f"blocks.{block}.ffn.experts"
        state.update({f"{prefix}.{name}": value for name, value in to_stacked(experts, moe["num_experts"]).items()})
    return state


def export_safetensors(run: str | Path, out: str | Path) -> Path:
    """One consolidated file (local layout, every expert) + the config, loadable anywhere without DeepSpeed."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    if Path(out).exists() or Path(out).is_symlink():
        what = "a folder" if Path(out).is_dir() else "a file"
        raise CheckpointError(
            f"--out {out} already exists ({what}); the export never replaces what is there: choose another "
            f"--out, or move that one away first"
        )
    state, client, ckpt = load_for_eval(run)
    if client["config"]["model"].get("tie_embeddings", True):
        state.pop("head.weight", None)  # shares storage with tok_emb.weight; re-tied on load
    meta = {
        "config": json.dumps(client["config"]),
        "step": str(client.get("step")),
        "vocab_fingerprint": str(client.get("vocab_fingerprint", "")),
        "source": str(ckpt),
    }
    out = Path(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CheckpointError(
            f"cannot create the folder of {out} ({e.strerror or e}); choose a writable --out"
        ) from None
    tmp = out.with_suffix(out.suffix + ".tmp")
    try:
        save_file({k: v.detach().contiguous() for k, v in state.items()}, str(tmp), metadata=meta)
        tmp.replace(out)
    except (OSError, RuntimeError, SafetensorError) as e:
        tmp.unlink(missing_ok=True)
        raise CheckpointError(
            f"cannot write {out} ({getattr(e, 'strerror', None) or e}); nothing was left half-written: "
            f"choose a writable --out with free space"
        ) from None
    return out


def _load_safetensors(path: Path) -> tuple[dict, dict, Path]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:
        raise CheckpointError(f"cannot read {path} ({type(e).__name__}: {e}); not a valid safetensors file") from None
    if "config" not in meta:
        raise CheckpointError(f"{path} has no s2moe config in its metadata: export it with `s2moe export`")
    client = {
        "config": json.loads(meta["config"]),
        "step": int(meta["step"]) if meta.get("step", "None") != "None" else None,
    }
    if meta.get("vocab_fingerprint"):
        client["vocab_fingerprint"] = meta["vocab_fingerprint"]
    if client["config"]["model"].get("tie_embeddings", True) and "head.weight" not in state:
        state["head.weight"] = state["tok_emb.weight"]
    return state, client, path


def load_for_eval(path: str | Path) -> tuple[dict, dict, Path]:
    """(state dict in the local layout, client state, source) from a run dir, checkpoints dir, tag dir
    or an exported ``.safetensors`` file."""
    if str(path).endswith(".safetensors"):
        return _load_safetensors(Path(path))
    ckpt = find_checkpoint(path)
    verify_checkpoint(ckpt)
    raw = read_state_file(model_state_file(ckpt))
    client = {k: v for k, v in raw.items() if k in ("step", "config", "vocab_fingerprint", "data", "tokenizer")}
    if "config" not in client:
        raise CheckpointError(f"{ckpt} has no s2moe config in its client state: not written by s2moe_ds")
    return consolidated_state(ckpt, client["config"]["model"]), client, ckpt


def run_tokenizer(client: dict, data_dir: str | None, source: Path):
    """(tokenizer, the data's meta.json or None) of a checkpoint: from its prepared data folder when that is
    there (``data_dir``, else the run's own; checked against the checkpoint), else the tokenizer the
    checkpoint carries (every checkpoint since 2026-12-07), saying so. A ``data_dir`` named by the user
    must exist."""
    import sys

    from ..data.errors import DataError
    from ..data.store import load_tokenizer, read_meta
    from ..data.tokenizers import Tokenizer

    folder = data_dir or config_from_dict(client["config"]).data.data_dir
    try:
        meta = read_meta(folder)
        check_compatible(client, meta, str(source))
    except (DataError, CheckpointError) as e:
        if data_dir or "tokenizer" not in client:
            raise
        why = "is not there" if isinstance(e, DataError) else "now holds other data"
        print(
            f"[s2moe] the run's data folder {folder} {why}; using the tokenizer kept in {source} "
            f"(text works, the run's own splits need its data: --data-dir)",
            file=sys.stderr,
        )
        return Tokenizer.from_saved(client["tokenizer"], f"checkpoint {source}"), None
    return load_tokenizer(folder, meta), meta


def parse_size(text: str) -> int:
    """'5GB', '500MB', '100KB' or a number of bytes."""
    units = {"KB": 2**10, "MB": 2**20, "GB": 2**30, "TB": 2**40}
    t = str(text).strip().upper()
    for unit, factor in units.items():
        if t.endswith(unit):
            t, mult = t[: -len(unit)], factor
            break
    else:
        mult = 1
    try:
        value = int(float(t) * mult)
    except ValueError:
        value = 0
    if value <= 0:
        raise ConfigError(f"--max-shard-size must be a positive size such as 5GB or 500MB, got {text!r}")
    return value


def shard(state: dict, max_bytes: int) -> list[dict]:
    """Tensors in order, a new shard whenever the next one would pass ``max_bytes`` (one tensor per shard
    at least)."""
    shards, current, size = [], {}, 0
    for key, value in state.items():
        nbytes = value.numel() * value.element_size()
        if current and size + nbytes > max_bytes:
            shards.append(current)
            current, size = {}, 0
        current[key] = value
        size += nbytes
    if current:
        shards.append(current)
    return shards


def hf_config(client: dict, tokenizer_kind: str, fingerprint: str, ckpt: Path) -> dict:
    """config.json of an export: the Hugging Face keys, the auto classes, and our model section."""
    model_cfg = client["config"]["model"]
    tied = model_cfg.get("tie_embeddings", True)
    return {
        "model_type": "s2moe",
        "architectures": ["S2MoEForCausalLM"],
        "auto_map": {
            "AutoConfig": "configuration_s2moe.S2MoEConfig",
            "AutoModelForCausalLM": "modeling_s2moe.S2MoEForCausalLM",
        },
        "vocab_size": model_cfg["vocab_size"],
        "hidden_size": model_cfg["d_model"],
        "num_hidden_layers": model_cfg["n_layer"],
        "num_attention_heads": model_cfg["n_head"],
        "max_position_embeddings": model_cfg["context"],
        "tie_word_embeddings": tied,
        "torch_dtype": "float32",
        "s2moe": model_cfg,
        "s2moe_step": client.get("step"),
        "s2moe_tokenizer": tokenizer_kind,
        "s2moe_vocab_fingerprint": fingerprint,
        "s2moe_source": str(ckpt),
    }


def write_weights(folder: Path, weights: dict, max_shard_bytes: int) -> None:
    """model.safetensors, or shards of at most ``max_shard_bytes`` and their index file."""
    from safetensors.torch import save_file

    parts = shard(weights, max_shard_bytes)
    if len(parts) == 1:
        save_file(parts[0], str(folder / WEIGHTS), metadata={"format": "pt"})
        return
    index = {"metadata": {"total_size": sum(v.numel() * v.element_size() for v in weights.values())}, "weight_map": {}}
    for i, part in enumerate(parts, 1):
        name = f"model-{i:05d}-of-{len(parts):05d}.safetensors"
        save_file(part, str(folder / name), metadata={"format": "pt"})
        index["weight_map"].update({k: name for k in part})
    (folder / INDEX).write_text(json.dumps(index, indent=1))


def export_pretrained(
    run: str | Path,
    out_dir: str | Path,
    data_dir: str | None = None,
    max_shard_bytes: int = 5 * 2**30,
    fmt: str = "auto",
) -> Path:
    """Write the export folder. ``fmt``: 'auto' (a stock transformers architecture where the model is
    exactly one, ``stock.py``; else ours), 'stock' (refused, saying why, when none fits) or 's2moe' (ours:
    loads in transformers with ``trust_remote_code`` and s2moe_ds installed)."""
    from safetensors import SafetensorError

    from ..data.errors import DataError
    from ..data.hf_tokenizer import write_auto_tokenizer

    if fmt not in FORMATS:
        raise ConfigError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")

    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise CheckpointError(f"{out} already exists and is not an empty folder; export into a new folder")
    state, client, ckpt = load_for_eval(run)
    try:
        tokenizer, meta = run_tokenizer(client, data_dir, ckpt)
    except DataError as e:
        if data_dir or "tokenizer" in client:
            raise
        raise DataError(
            f"the export carries the run's tokenizer, read from its prepared data folder (this checkpoint "
            f"keeps none of its own): {e}; pass --data-dir with the folder the run was trained on"
        ) from None
    fingerprint = vocab_fingerprint(meta) if meta else client.get("vocab_fingerprint", "")
    config = hf_config(client, tokenizer.kind, fingerprint, ckpt)
    files = _export_files(state, config, tokenizer.eod_id, fmt)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        write_weights(tmp, files.pop("weights"), max_shard_bytes)
        extra = files.pop("extra", None)
        if extra:
            from safetensors.torch import save_file

            save_file(extra, str(tmp / EXTRA), metadata={"format": "pt"})
        for name, text in files.items():
            (tmp / name).write_text(text)
        tokenizer.save_pretrained(tmp)
        try:
            write_auto_tokenizer(tokenizer, tmp, config["max_position_embeddings"])
        except DataError as e:
            print(f"[s2moe export] note: {e}", file=sys.stderr)
        if out.exists():
            out.rmdir()  # the empty folder the user may have made
        tmp.rename(out)
    except (OSError, RuntimeError, SafetensorError) as e:  # safetensors reports a full disk as its own error
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(
            f"cannot write the export {out} ({getattr(e, 'strerror', None) or e}); nothing was left "
            f"half-written: choose a writable --out with free space"
        ) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _export_files(state: dict, config: dict, eos_token_id: int | None, fmt: str) -> dict:
    """What the folder holds besides the tokenizer: {'weights': state dict, 'extra': state dict (stock),
    file name: text}. A stock architecture where one fits (``fmt`` 'auto'/'stock'), else ours."""
    from .stock import stock_config, stock_fit, stock_weights

    model = _model_from(config["s2moe"], state)
    model_type, why = stock_fit(model)
    if fmt == "stock" and model_type is None:
        raise CheckpointError(f"--format stock: no stock transformers architecture fits this model: {why}")
    if fmt != "s2moe" and model_type is not None:
        weights, extra = stock_weights(model, state, model_type)
        stock = stock_config(model, model_type, eos_token_id)
        return {"weights": weights, "extra": extra, CONFIG: json.dumps(stock, indent=1),
                STOCK_CONFIG: json.dumps({**config, "s2moe_stock_type": model_type}, indent=1)}  # fmt: skip
    tied = config["s2moe"].get("tie_embeddings", True)
    weights = {PREFIX + k: v.detach().contiguous() for k, v in state.items() if not (tied and k == "head.weight")}
    return {"weights": weights, CONFIG: json.dumps(config, indent=1), **CODE}


def _model_from(model_cfg: dict, state: dict | None = None):
    """Our model for an exported config (local backend, one process), in eval mode, with ``state``."""
    from ..model import MoELanguageModel

    cfg = model_config_from_dict(model_cfg, prefix="s2moe")
    cfg.moe.backend, cfg.moe.ep_size = "local", 1
    model = MoELanguageModel(cfg)
    if state is not None:
        model.load_state_dict(state)
    return model.eval()


def read_weights(folder: Path, strip_prefix: bool = True) -> dict:
    from safetensors.torch import load_file

    index = folder / INDEX
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else [WEIGHTS]
    state = {}
    for name in files:
        f = folder / name
        if not f.exists():
            raise CheckpointError(f"{f} is missing: the export is incomplete")
        state.update(load_file(str(f)))
    if not strip_prefix:
        return state
    return {k[len(PREFIX) :] if k.startswith(PREFIX) else k: v for k, v in state.items()}


def load_pretrained(folder: str | Path, device: str | torch.device | None = None):
    """(model in eval mode, tokenizer) from an exported folder, with nothing else present."""
    from ..data.tokenizers import Tokenizer
    from ..model import MoELanguageModel

    folder = Path(folder)
    if not is_export(folder):
        raise CheckpointError(
            f"{folder} is not an s2moe export (no {CONFIG} with model_type 's2moe'); make one with "
            f"`s2moe export RUN --out {folder}`"
        )
    stock = (folder / STOCK_CONFIG).is_file()
    config = export_config(folder)
    model_cfg = model_config_from_dict(config["s2moe"], prefix="s2moe")
    model_cfg.moe.backend, model_cfg.moe.ep_size = "local", 1
    model = MoELanguageModel(model_cfg)
    if stock:
        from safetensors.torch import load_file

        from .stock import from_stock_weights

        try:
            state = from_stock_weights(model, read_weights(folder, strip_prefix=False), config["s2moe_stock_type"])
        except KeyError as key:
            raise CheckpointError(f"{folder}: the weights lack {key}; the export is incomplete") from None
        if (folder / EXTRA).is_file():
            state.update(load_file(str(folder / EXTRA)))
    else:
        state = read_weights(folder)
    if model_cfg.tie_embeddings and "head.weight" not in state:
        state["head.weight"] = state["tok_emb.weight"]
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise CheckpointError(f"{folder}: the weights do not fit its config.json ({str(e).splitlines()[0]})") from None
    model.eval()
    if device is not None:
        model.to(device)
    return model, Tokenizer.from_pretrained(folder)
