"""The model zoo: small classifiers for compression experiments, each built from a Hydra config.

Every model takes ``num_classes``, ``in_channels`` and ``image_size`` (interpolated from the
dataset config in ``conf/model/*.yaml``) so that switching dataset never needs a model edit.
"""
