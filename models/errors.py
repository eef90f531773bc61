"""Errors shared by the model loaders (kept free of torch so configs can be checked cheaply)."""


class CheckpointError(ValueError):
    """A checkpoint that does not match the model it is loaded into."""
