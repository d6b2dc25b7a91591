"""Hugging Face ``transformers`` classes for an exported s2moe_ds folder (optional extra: ``pip install
s2moe_ds[hf]``).

    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained("tiny-export", trust_remote_code=True)

The export (``s2moe export RUN --out DIR``) writes ``configuration_s2moe.py`` and ``modeling_s2moe.py``
into the folder, each importing the classes below, and names them in ``config.json``'s ``auto_map``; so
``trust_remote_code=True`` finds them with s2moe_ds installed. ``import s2moe_ds.hf`` also registers them
with the Auto classes (then ``trust_remote_code`` is not needed). The model is this package's
``MoELanguageModel`` (at ``.model``), evaluated as exported: routing, S2MoE's clean pathway, top-k.
"""

from __future__ import annotations

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutput

from .config import ModelConfig, model_config_from_dict


class S2MoEConfig(PretrainedConfig):
    """``s2moe``: this package's resolved model config (``model`` section) plus the usual names."""

    model_type = "s2moe"

    def __init__(self, s2moe: dict | None = None, **kwargs):
        self.s2moe = s2moe or {}
        m = self.s2moe
        kwargs.setdefault("tie_word_embeddings", bool(m.get("tie_embeddings", True)))
        super().__init__(**kwargs)
        self.vocab_size = m.get("vocab_size", 0)
        self.hidden_size = m.get("d_model", 0)
        self.num_hidden_layers = m.get("n_layer", 0)
        self.num_attention_heads = m.get("n_head", 0)
        self.max_position_embeddings = m.get("context", 0)

    def model_config(self) -> ModelConfig:
        cfg = model_config_from_dict(self.s2moe, prefix="s2moe")
        cfg.moe.backend, cfg.moe.ep_size = "local", 1
        return cfg


class S2MoEForCausalLM(PreTrainedModel):
    config_class = S2MoEConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    _tied_weights_keys = {"model.head.weight": "model.tok_emb.weight"}

    def __init__(self, config: S2MoEConfig):
        super().__init__(config)
        from .model import MoELanguageModel

        self.model = MoELanguageModel(config.model_config())
        self.post_init()

    def _init_weights(self, module):  # the weights come from the checkpoint; keep the package's own init
        pass

    def get_input_embeddings(self):
        return self.model.tok_emb

    def get_output_embeddings(self):
        return self.model.head

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None, **_) -> CausalLMOutput:
        """Logits of every position; with ``labels`` (the input ids: shifted here, as transformers does) the
        mean next-token cross-entropy."""
        out = self.model(input_ids)
        loss = None
        if labels is not None:
            loss = torch.nn.functional.cross_entropy(
                out.logits[:, :-1].float().reshape(-1, out.logits.shape[-1]), labels[:, 1:].reshape(-1)
            )
        return CausalLMOutput(loss=loss, logits=out.logits)


AutoConfig.register("s2moe", S2MoEConfig, exist_ok=True)
AutoModelForCausalLM.register(S2MoEConfig, S2MoEForCausalLM, exist_ok=True)
