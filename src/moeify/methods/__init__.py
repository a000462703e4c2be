"""One module per conversion method; importing this package registers them all."""

from .cmoe import CMoEConfig
from .mlpmoe import MLPMoEConfig
from .prune import PruneConfig

__all__ = ["CMoEConfig", "MLPMoEConfig", "PruneConfig"]
