"""Compression methods: each a config object and one function that applies it to a model."""
