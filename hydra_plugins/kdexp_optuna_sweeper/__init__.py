"""kdexp's Hydra sweeper on Optuna >= 4 (``hydra/sweeper=kdexp_optuna``): persistent studies,
single- and multi-objective search, and pruning of hopeless trials (:mod:`kdexp.search`)."""

from __future__ import annotations


def register() -> None:
    """Make sure Hydra knows :class:`~.sweeper.KdexpOptunaSweeper`.

    Hydra finds plugins by listing the folders of the ``hydra_plugins`` namespace. An installed
    wheel puts this package in such a folder; an editable install (``pip install -e``, as the
    Makefile does) serves it through an import hook that the listing cannot see, so the ``kdexp``
    command registers the class itself before Hydra starts.
    """
    from hydra.core.plugins import Plugins
    from hydra.plugins.sweeper import Sweeper

    from .sweeper import KdexpOptunaSweeper

    plugins = Plugins.instance()
    if KdexpOptunaSweeper not in plugins.discover(Sweeper):
        plugins._register(KdexpOptunaSweeper)
