"""``train.init_from``: start a run from another one's weights (fine-tuning). Weights only: the optimizer,
schedule and step start fresh, in any parallel layout (expert parallelism, ZeRO, world size).

The source is a run directory, a checkpoints folder, a checkpoint tag folder, a ``.safetensors`` export or
an exported folder (ours or a stock one). Its weights are read in the local layout (every expert) and set
into this run's model through each parameter's portable key (``portable.portable_keys``: an expert
parameter by its global names, whatever backend holds it here), before the DeepSpeed engine copies them
into its fp32 masters. Refused, naming the difference and changing nothing: another vocabulary
(the data's vocabulary fingerprint), or another architecture (any parameter missing, extra or of another
shape). Settings that hold no weights (top-k, context with rotary positions, dropout, the router's
losses) may change.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from ..data.store import load_tokenizer
from ..data.tokenizers import Tokenizer
from .export import export_config, is_export, load_for_eval, load_pretrained
from .portable import portable_keys
from .resume import vocab_fingerprint
from .store import CheckpointError

STACKED = re.compile(r"^(blocks\.\d+\.ffn\.experts)\.([^.]+)$")  # a stacked expert matrix [E, ...], local layout


def read_source(path: str) -> tuple[dict, str, Tokenizer | None, str]:
    """(state dict in the local layout, its vocabulary fingerprint or '', its tokenizer when it keeps one,
    what was read) of ``path``."""
    if is_export(path):
        folder = Path(path)
        config = export_config(folder)
        model, tokenizer = load_pretrained(folder)
        return model.state_dict(), config.get("s2moe_vocab_fingerprint", ""), tokenizer, f"the export {folder}"
    state, client, source = load_for_eval(path)
    saved = client.get("tokenizer")
    tokenizer = Tokenizer.from_saved(saved, f"checkpoint {source}") if saved else None
    return state, client.get("vocab_fingerprint", ""), tokenizer, f"checkpoint {source}"


def check_vocabulary(path: str, what: str, fingerprint: str, source_tok, data_dir: str, meta: dict) -> None:
    """Refuse data whose token ids mean other tokens than the source's: compared token by token when the
    source keeps its tokenizer (then the same tokenizer file prepared over another corpus passes), else by
    the data's vocabulary fingerprint."""
    if source_tok is not None:
        mine = load_tokenizer(data_dir, meta)
        a, b = source_tok.id_table(), mine.id_table()
        if a == b:
            return
        first = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        detail = f"{len(a)} tokens in the source, {len(b)} here; the first to differ is id {first}"
    elif not fingerprint or fingerprint == vocab_fingerprint(meta):
        return
    else:
        detail = f"fingerprint {fingerprint}, this run's data {vocab_fingerprint(meta)}"
    raise CheckpointError(
        f"train.init_from {path}: {what} was trained on another vocabulary ({detail}); fine-tuning keeps the "
        f"token ids: prepare the new data with the source's tokenizer (data.tokenizer=EXPORT/tokenizer.json "
        f"of its `s2moe export`, which keeps the same ids) or train from scratch"
    )


def portable_state(state: dict) -> dict:
    """A local-layout state dict under portable keys: stacked experts split into ``w1#e``."""
    out = {}
    for key, value in state.items():
        m = STACKED.match(key)
        if m:
            out.update({f"{m[1]}.{m[2]}#{e}": value[e] for e in range(value.shape[0])})
        else:
            out[key] = value
    return out


def init_from(model, path: str, meta: dict, data_dir: str) -> str:
    """Set ``model``'s weights (and buffers) from ``path``; returns a line saying what was loaded."""
    state, fingerprint, source_tok, what = read_source(path)
    check_vocabulary(path, what, fingerprint, source_tok, data_dir, meta)
    source = portable_state(state)
    tied_source = "head.weight" not in source or torch.equal(source["head.weight"], source.get("tok_emb.weight"))
    if model.cfg.tie_embeddings:
        source.pop("head.weight", None)  # the tied head is the embedding
    values, problems = _match(model, source)
    if model.cfg.tie_embeddings and not tied_source:
        problems.insert(0, "the source has an output head of its own (tie_embeddings false), this model ties it")
    if problems:
        shown = "; ".join(problems[:6]) + (f"; and {len(problems) - 6} more" if len(problems) > 6 else "")
        raise CheckpointError(
            f"train.init_from {path}: {what} is another architecture ({shown}); fine-tuning starts from "
            f"the same model: use the source run's model section (its config.yaml), changing only settings "
            f"that hold no weights"
        )
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in values.items():
            params[name].copy_(value.to(params[name].dtype))
        for name, buf in model.named_buffers():
            if name in source and buf is not None:
                buf.copy_(source[name].to(buf.dtype))
    return f"[s2moe] weights from {what} (train.init_from): {len(values)} parameters; optimizer and schedule fresh"


def _match(model, source: dict) -> tuple[dict, list[str]]:
    """({parameter name: its value from ``source``}, the differences that make it another architecture:
    expert counts first, then parameters missing, extra or of another shape)."""
    targets = portable_keys(model)
    wanted = {key for _, _, keys in targets for key, _ in keys}
    # an expert-parallel rank holds some experts; the others' are the same parameters, held elsewhere
    bases = {k.rsplit("#", 1)[0] for k in wanted if "#" in k}
    experts = model.cfg.moe.num_experts
    problems = []
    for base in sorted(bases):
        n = sum(1 for k in source if "#" in k and k.rsplit("#", 1)[0] == base)
        if n != experts:
            problems.append(f"{base}: {n} experts in the source, {experts} in this model")
    held_elsewhere = {k for k in source if "#" in k and k.rsplit("#", 1)[0] in bases}
    if not problems:  # with other expert counts, every expert parameter would be listed below
        problems += [f"{k} missing from the source" for k in sorted(wanted - set(source))]
    buffers = {name for name, _ in model.named_buffers()}
    problems += [f"{k} is not in this model" for k in sorted(set(source) - wanted - held_elsewhere - buffers)]
    values = {}
    for name, p, keys in targets:
        if all(k in source for k, _ in keys):
            value = torch.stack([source[k] for k, _ in keys]) if keys[0][1] is not None else source[keys[0][0]]
            if value.shape != p.shape:
                problems.append(f"{name}: source {tuple(value.shape)}, this model {tuple(p.shape)}")
            values[name] = value
    return values, problems
