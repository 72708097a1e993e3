"""Quantization: post-training int8 (static, dynamic) and quantization-aware training.

- ``method=quantize/ptq_int8``: :class:`kdexp.method.quantize.ptq.PTQInt8`
- ``method=quantize/dynamic_int8``: :class:`kdexp.method.quantize.ptq.DynamicInt8`
- ``method=quantize/qat``: :class:`kdexp.method.quantize.qat.QAT` (8, 4, 2 or 1 bits)

int8 models come from :mod:`kdexp.method.quantize.backend` (torch.ao FX, CPU). Models below 8
bits are saved packed; :func:`load_packed` turns a ``final.pt`` back into a runnable model.
"""

from kdexp.method.quantize.packed import load_packed

__all__ = ["load_packed"]
