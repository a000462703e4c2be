"""One module per conversion method; importing this package registers them all."""

from .cmoe import CMoEConfig
from .expertweaver import ExpertWeaverConfig
from .llama_moe import LlamaMoEConfig
from .mlpmoe import MLPMoEConfig
from .moefication import MoEficationConfig
from .prune import PruneConfig

__all__ = ["CMoEConfig", "ExpertWeaverConfig", "LlamaMoEConfig", "MLPMoEConfig", "MoEficationConfig", "PruneConfig"]
