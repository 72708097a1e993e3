# Installed as the package kdexp.conf (see pyproject.toml) so that Hydra finds this config tree
# through pkg://kdexp.conf both in an editable checkout and in a built wheel.
