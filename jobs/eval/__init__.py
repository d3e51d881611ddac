"""Evaluation: the quality yardstick every compression and training job is measured with."""
