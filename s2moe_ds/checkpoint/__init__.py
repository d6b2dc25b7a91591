"""Checkpoints: DeepSpeed's files of a tag, the run's records beside them, and copies any layout can read.

- ``store.py``: partial write -> manifest -> publish -> verify; ``latest``, run id, config, leftovers;
- ``resume.py``: which checkpoint a run continues from, and whether it fits (vocabulary, shape, data);
- ``portable.py``: the layout-free copy (``ParallelLayout``, per-expert global names, ZeRO fragments)
  that lets a run resume under another parallel layout;
- ``reshard.py``: ``s2moe reshard``, that conversion ahead of time;
- ``export.py``: the consolidated weights for evaluation, ``.safetensors`` and Hugging Face-style exports,
  ``load_pretrained``;
- ``deepspeed_private.py``: every call into DeepSpeed internals, with the version it was written against.
"""

from .export import export_pretrained, export_safetensors, load_for_eval, load_pretrained
from .resume import check_compatible, check_resume_config, resolve_resume, vocab_fingerprint
from .store import CheckpointError, find_checkpoint, read_client_state, read_manifest, verify_checkpoint, write_manifest

__all__ = [
    "CheckpointError",
    "check_compatible",
    "check_resume_config",
    "export_pretrained",
    "export_safetensors",
    "find_checkpoint",
    "load_for_eval",
    "load_pretrained",
    "read_client_state",
    "read_manifest",
    "resolve_resume",
    "verify_checkpoint",
    "vocab_fingerprint",
    "write_manifest",
]
