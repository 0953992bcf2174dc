"""User-facing errors. Entry points print these without a traceback and exit non-zero."""


class DistLLMError(Exception):
    """A problem with the user's input or set-up; the message names the thing and the fix."""


class CheckpointError(DistLLMError):
    """A checkpoint or engine file is missing, truncated, corrupted or lacks a tensor."""
