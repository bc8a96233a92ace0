"""Learned estimators (latency baselines, structure, isolation forest): arrays in, scores out."""
