"""Simulated environments shared by demo generation and closed-loop policy evaluation."""
