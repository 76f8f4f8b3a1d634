"""Evaluation: reconstruction metrics, latent-action probes, closed-loop rollouts."""
