"""Hugging Face transformers MoE models on lightning-moe: convert in place, train, convert back.

::

    import lightning_moe as lmoe
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path)      # Mixtral, Qwen2/3-MoE, OLMoE, DeepSeek-V3, GPT-OSS, ...
    report = lmoe.from_hf(model)                             # in place; print(report)
    ...                                                      # train with Trainer(strategy="moe")
    lmoe.to_hf(model)                                        # HF blocks back, trained weights
    model.save_pretrained(out)                               # AutoModelForCausalLM.from_pretrained(out) loads it

Which blocks. :func:`from_hf` recognises transformers' v5 convention by rule (``rules.py``): a router
child (``gate``/``router``, ``*Router``) returning ``(logits, top_k_weights, top_k_index)``, an
``*Experts`` bank with stacked ``gate_up_proj``/``down_proj``, optionally a SwiGLU shared expert and
its sigmoid ``shared_expert_gate``. How the router computes its weights is found by running it
against our routings, so new families built the same way convert too; anything else is refused
with a ``ValueError`` naming the block type. Each routing feature is a general ``MoE`` option:
``router_bias``, ``score_func="softmax_topk"``, ``num_groups``/``top_groups``,
``routed_scaling_factor``, ``use_expert_bias`` (HF's ``e_score_correction_bias`` *is* our
``expert_bias`` buffer), ``shared_expert_gate``, ``activation="swiglu_oai"``.

No weight is kept twice (``layout.py``): routers keep HF's own tensors; expert weights are copied once
into our contiguous layout and HF's tensors released (``weights="copy"``, the default, faster to
train), or used as strided views of HF's storage with no copy at all (``weights="view"``, a
transposing gradient copy each backward); GPT-OSS's interleaved ``gate_up_proj`` is copied either way.
Routers compute in float32 (as ``MoE`` always does); HF's Mixtral/Qwen/OLMoE/GPT-OSS routers
compute logits in the model dtype, so in bf16 a near-tie may pick another expert than HF would.

Balancing losses. HF adds its loss only when ``output_router_logits`` is set, as
``router_aux_loss_coef * E * sum_i f_i * P_i`` with ``f_i`` (assignments per token, summing to k)
and ``P_i`` (mean router probability) *pooled over all layers* before the product: it equals ``k``
(not 1) at perfect balance and couples the layers. Ours (``MoE.aux_loss``) is per layer,
``E * sum_i f_i P_i`` with ``f_i`` summing to 1, equal to 1 at balance. ``from_hf(aux_loss=...)``:

- ``"lightning_moe"`` (default): our per-layer loss with ``aux_loss_coef`` defaulting to
  ``router_aux_loss_coef * k / L`` (HF's value at balance, and its gradient when layers are loaded
  alike), added by :class:`~lightning_moe.MoELightningModule`; HF's own is switched off.
- ``"hf"``: HF's training loss exactly: ``config.output_router_logits = True``, our routers' logits
  are recorded as ``outputs.router_logits`` and the model's ``forward(labels=...)`` adds
  ``router_aux_loss_coef * load_balancing_loss_func(...)`` itself; our layers add nothing.
- ``"none"``: neither.

transformers is optional (``pip install 'lightning-moe[hf]'``): this package imports without it;
:func:`from_hf` raises an ``ImportError`` saying how to install it.
"""

from lightning_moe.hf.block import HFMoEBlock
from lightning_moe.hf.convert import ConvertedBlock, HFConversionReport, from_hf, to_hf

__all__ = ["ConvertedBlock", "HFConversionReport", "HFMoEBlock", "from_hf", "to_hf"]
