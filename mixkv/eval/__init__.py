"""Evaluation utilities for mixkv: metrics, dataset loaders and synthetic benchmark suites."""
