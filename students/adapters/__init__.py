"""Adapters that wrap a frozen encoder for domain adaptation (``DESIGN.md``, Adaptation).

``build_adapter(name, encoder, **kwargs)`` freezes any encoder of the project (a DFA student or
SAM's ``ImageEncoderViT``) and returns an ``AdaptedEncoder`` with the encoder's call signature
(``[B, 3, S, S] -> [B, 256, S/16, S/16]``) and ``img_size``, which can replace
``sam.image_encoder``. ``list_adapters()`` names the methods, one per file:

* ``lora``: low-rank bypass on every attention ``qkv``, mergeable (``lora.py``);
* ``conv_lora``: LoRA with a mixture of multi-scale conv experts, not mergeable (``conv_lora.py``);
* ``cad``: a parallel CNN on the image added to the embedding, encoder under no_grad (``cad.py``);
* ``sam_adapter``: bottleneck adapters inside every block (``sam_adapter.py``);
* ``meta``: a side network of MEA blocks fed by the encoder's taps, encoder under no_grad
  (``meta.py``, blocks in ``mea.py``);
* ``decoder``: no adapter, only the mask decoder trains (``decoder.py``).

Every ``AdaptedEncoder`` has ``num_trainable``, ``trainable_parameters()`` and ``aux_loss()``
(Conv-LoRA's balancing loss of the last forward, else 0), to add to the task loss.
"""

from students.adapters import cad as _cad  # noqa: F401  (each import registers a method)
from students.adapters import conv_lora as _conv_lora  # noqa: F401
from students.adapters import decoder as _decoder  # noqa: F401
from students.adapters import lora as _lora  # noqa: F401
from students.adapters import meta as _meta  # noqa: F401
from students.adapters import sam_adapter as _sam_adapter  # noqa: F401
from students.adapters.base import (
    AdaptedEncoder,
    build_adapter,
    list_adapters,
    register_adapter,
)

__all__ = ["AdaptedEncoder", "build_adapter", "list_adapters", "register_adapter"]
