"""Dataset sources, one module per source; each ``load(...)`` returns a :class:`base.Data`.

conf/dataset/<name>.yaml names the source function as its ``_target_`` (a ``_partial_``); the run
calls it with ``batch_size`` and ``seed``.
"""
