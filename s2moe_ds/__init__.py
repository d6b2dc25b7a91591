"""s2moe_ds: S2MoE and its router family, trained under DeepSpeed."""
__version__ = "0.1.0"
