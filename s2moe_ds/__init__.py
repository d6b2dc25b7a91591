"""s2moe_ds: S2MoE and its router family, trained under DeepSpeed."""

__version__ = "0.1.0"


def load_pretrained(folder, device=None):
    """(model, tokenizer) from a folder written by ``s2moe export RUN --out FOLDER`` (see s2moe_ds/checkpoint/export.py)."""
    from .checkpoint.export import load_pretrained as _load

    return _load(folder, device)


__all__ = ["load_pretrained"]
