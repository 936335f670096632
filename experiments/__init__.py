"""Experiment configs and thin absl launchers."""
