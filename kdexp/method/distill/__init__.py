"""Knowledge distillation: a student trained to match a frozen teacher.

One module per method, each a subclass of :class:`kdexp.method.distill.base.Distiller`, selected as
``method=distill/<name>``. The teacher is a model config composed at ``teacher``
(``model@teacher=resnet32x4``); its weights come from ``teacher_checkpoint``.
"""
