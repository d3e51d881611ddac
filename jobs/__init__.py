"""Offline work run as Ray jobs: data preparation, compression, evaluation, training, benchmarks."""
