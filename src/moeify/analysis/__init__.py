"""How MoE-like is each converted MLP: `moeify analyze` (run.py), its metrics (metrics.py) and the
optional distillation of small students (distill.py). Imported lazily; nothing here runs at `import moeify`."""

from .run import AnalysisSettings, analyze

__all__ = ["AnalysisSettings", "analyze"]
