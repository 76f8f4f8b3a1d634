"""Baselines the paper compares LAPA with (VPT: pseudo-labels from an inverse-dynamics model)."""
