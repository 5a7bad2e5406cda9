"""Invoke entry point in a checkout: the same task collection as the installed `image-factory` command."""

from image_factory.cli import ns

__all__ = ["ns"]
