"""Hypothesis profiles for the data tests."""

from hypothesis import Phase, settings

# `--hypothesis-profile=no-shrink` reports the first failing population at once: for checking
# that the leakage properties catch a planted leak without minutes of shrinking.
settings.register_profile("no-shrink", phases=[Phase.explicit, Phase.reuse, Phase.generate])
