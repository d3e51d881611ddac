"""Models: the known offline models, GGUF conversion, opening and loading stored models."""
