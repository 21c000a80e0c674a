"""The version of patchssl (read by the build, the command line and checkpoints)."""

__version__ = "0.2.0.dev0"
