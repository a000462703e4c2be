"""One module per conversion method; importing this package registers them all."""

from .mlpmoe import MLPMoEConfig

__all__ = ["MLPMoEConfig"]
