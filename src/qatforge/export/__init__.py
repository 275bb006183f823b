"""Deployment exports built from a run's merged checkpoint."""
