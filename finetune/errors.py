"""The one exception type for mistakes a user can make (bad paths, keys, images, checkpoints)."""

__all__ = ["FinetuneError"]


class FinetuneError(Exception):
    """A user-facing error: the message says what was wrong and what to do about it."""
