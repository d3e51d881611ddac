"""Errors a replica's engine raises to its callers (light: the ingress imports this to tell them apart)."""


class EngineDeadError(RuntimeError):
    """The engine loop stopped on an internal error: the replica must be replaced; retry elsewhere."""
