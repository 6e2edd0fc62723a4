"""transformers loads elutq checkpoints: ``AutoModelForCausalLM.from_pretrained(CKPT)`` after ``import elutq``.

The checkpoint's ``quantization_config`` (``quant_method: "hlq"``) selects ``HLQHfQuantizer``: before the
weights load it puts an ``HLQLinear`` (or ``HLQEmbedding``) wherever ``modules`` names one, and the
modules of a rotated checkpoint (``rotate_modules``: final norm, MLPs), so the tensors load into them by
name; after, an embedding stored as ``lm_head``'s tensor (``shared_with``) is pointed at it, and the linears
are set to multiply through the native LUT kernels on CPU (``use_kernels``; ``$ELUTQ_HF_KERNELS=off`` keeps
the torch reference of the format — dequantize, then matmul — that the rest of elutq checks its kernels
against; ``float``: exact float tables).  ``save_pretrained`` writes the same tensors back, a checkpoint every
elutq loader reads.  The native runtime (``elutq.load``) is still the fastest path.

``register()`` runs when transformers is imported after elutq (an import hook set by ``elutq/__init__``), or
at once if it already was.
"""

from __future__ import annotations

import os
from typing import Any

from torch import nn
from transformers.quantizers import HfQuantizer, register_quantization_config, register_quantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from .checkpoint import EMBED, QUANT_METHOD, SHARDS_KEY, SHARED, checkpoint_tensors, module_group_size
from .modules import HLQEmbedding, HLQLinear, rotate_modules, set_module
from .utils import ElutqError


class HLQConfig(QuantizationConfigMixin):
    """A checkpoint's ``quantization_config`` as transformers holds it: every field kept as written."""

    def __init__(self, modules: dict[str, dict[str, Any]] | None = None, **kwargs: Any):
        self.quant_method = QUANT_METHOD
        self.modules = modules or {}
        for k, v in kwargs.items():
            setattr(self, k, v)

    def to_dict(self) -> dict[str, Any]:
        """What ``save_pretrained`` writes: everything but the shards' checksums, which describe the files this
        config was read with, not the ones being written."""
        d = super().to_dict()
        d.pop(SHARDS_KEY, None)
        return d


class HLQHfQuantizer(HfQuantizer):
    """Loads prequantized HLQ checkpoints (quantizing happens in ``elutq quantize``)."""

    requires_calibration = True

    def validate_environment(self, *args: Any, **kwargs: Any) -> None:
        pass

    def _process_model_before_weight_loading(self, model: nn.Module, **kwargs: Any) -> None:
        if SHARED in self.quantization_config.modules.get(EMBED, {}):  # its tensors are lm_head's, tied after
            model._keys_to_ignore_on_load_missing = [*(model._keys_to_ignore_on_load_missing or []),
                                                     rf"{EMBED}\.(qweight|scales|zeros)"]  # fmt: skip
        # A rotated checkpoint's final norm and MLPs (rotation.py); one this elutq cannot apply is refused
        rotate_modules(model, getattr(self.quantization_config, "rotation", None))
        for name, spec in self.quantization_config.modules.items():
            old = model.get_submodule(name)
            if isinstance(old, nn.Embedding):
                new: nn.Module = HLQEmbedding(old.embedding_dim, old.num_embeddings, spec["bits"],
                                              module_group_size(spec, old.embedding_dim), dtype=old.weight.dtype)
                new.tied = SHARED in spec
            else:
                g = module_group_size(spec, old.in_features)
                new = HLQLinear(old.in_features, old.out_features, spec["bits"], g, bias=old.bias is not None)
            set_module(model, name, new)

    def _process_model_after_weight_loading(self, model: nn.Module, **kwargs: Any) -> nn.Module:
        shared = self.quantization_config.modules.get(EMBED, {}).get(SHARED)
        if shared:
            emb, head = model.get_submodule(EMBED), model.get_submodule(shared)
            emb.qweight, emb.scales, emb.zeros = head.qweight, head.scales, head.zeros
        use_kernels(model, os.environ.get(KERNELS_ENV, "lut"))
        return model

    def update_dtype(self, dtype):
        return dtype

    def param_needs_quantization(self, model, param_name: str, **kwargs: Any) -> bool:
        return False  # the checkpoint holds the packed tensors themselves

    @property
    def is_trainable(self) -> bool:
        return False

    def is_serializable(self, **kwargs: Any) -> bool:
        return True  # save_pretrained writes a checkpoint elutq reads (without shard checksums: see to_dict)

    def get_state_dict_and_metadata(self, model: nn.Module) -> tuple[dict[str, Any], dict[str, str]]:
        """The tensors ``save_quantized`` would write (a shared embedding's stored once, as lm_head's; plain
        floats back in 16 bits, whatever dtype the model was loaded in)."""
        return checkpoint_tensors(model)[0], {}


KERNELS_ENV = "ELUTQ_HF_KERNELS"  # lut (default) | float | off: how from_pretrained's linears multiply


def use_kernels(model: nn.Module, mode: str = "lut") -> nn.Module:
    """Run ``model``'s quantized linears through the LUT kernels (``"lut"``: int8 tables, as the runtime;
    ``"float"``: exact float tables, slow) or the dequantized weights (``"off"``: elutq's torch reference)."""
    if mode not in HLQLinear.KERNEL_MODES:
        raise ElutqError(f"kernel mode must be one of {HLQLinear.KERNEL_MODES} (${KERNELS_ENV}), got {mode!r}")
    for m in model.modules():
        if isinstance(m, HLQLinear) and not isinstance(m, HLQEmbedding):
            m.kernels = mode
    return model


_registered = False


def register() -> None:
    """Make ``quant_method: "hlq"`` known to transformers (once)."""
    global _registered
    if not _registered:
        register_quantization_config(QUANT_METHOD)(HLQConfig)
        register_quantizer(QUANT_METHOD)(HLQHfQuantizer)
        _registered = True


register()
