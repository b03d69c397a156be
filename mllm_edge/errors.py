"""The one exception type users see: the CLI prints its message and exits non-zero, without a traceback."""


class MllmEdgeError(Exception):
    """A problem with the user's input or environment, described so that they can fix it."""


class UnsupportedModelError(MllmEdgeError):
    """The checkpoint uses an architecture or option mllm-edge does not implement."""
