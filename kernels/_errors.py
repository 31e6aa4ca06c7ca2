"""The kernels' error for NaN or inf inputs: a ValueError, so callers that catch bad input still do; a trainer
catches this one alone to skip a bad step instead of stopping."""


class NonFiniteError(ValueError):
    """NaN or inf in the inputs of a log-prob or advantage computation."""
