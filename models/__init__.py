"""Torch models, the DP-SGD training and evaluation loops, and binned model quality; no I/O.

Import the submodules (``models.training``, ``models.tabular``, ``models.imaging``,
``models.evaluation``): the package itself imports nothing, so that a module needing only
``models.evaluation`` (numpy) does not pull in torch.
"""
