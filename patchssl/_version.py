"""The version of patchssl (read by the build, the command line and checkpoints)."""

__version__ = "0.1.0"
