"""Compression methods. Each is one module here and one yaml under conf/method/ (its ``_target_``).

Families nest by folder: ``method=baseline``, ``method=distill/<name>``, ``method=prune/<name>``,
``method=quantize/<name>``. Every method subclasses :class:`kdexp.method.base.Method`.
"""
