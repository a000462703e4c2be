"""moeify: dense LLM MLPs into Mixture-of-Experts layers, without training.

    import moeify
    model = moeify.convert("HuggingFaceTB/SmolLM2-135M-Instruct", moeify.MLPMoEConfig(branches=8))
    model.save_pretrained("out/smollm2-mlpmoe-b8")

Importing moeify registers its model classes with transformers' Auto classes,
so converted checkpoints reload with AutoModelForCausalLM.from_pretrained.
It does not import lm-eval or initialise CUDA.

Imported before torch (as the `moeify` command is), it turns on torch's own switch for large CPU
tensors on transparent huge pages (THP_MEM_ALLOC_ENABLE=1, unless the environment sets it):
conversion allocates and frees tensors of tens of MB per layer, and on 4 KiB pages each one costs
thousands of page faults (13-16 million per SmolLM2 conversion; docs/protocol.md "Speed").
"""

import logging as _logging
import os as _os

_os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")  # read once, at torch's first allocation

from ._version import __version__  # noqa: E402,F401

_logging.getLogger("moeify").addHandler(_logging.NullHandler())

from .errors import AssetError, InputError, MoeifyError  # noqa: E402
from .models.modeling import register_all as _register_all  # noqa: E402

_register_all()

from .blocks.moe import MoEMLP  # noqa: E402
from .core.method import LayerResult, MethodConfig, config_for, method_names  # noqa: E402
from .core.plan import LayerPlan  # noqa: E402
from .data.calibration import Calibration  # noqa: E402
from .finetuning import FinetuneConfig, finetune  # noqa: E402
from .methods import CMoEConfig, ExpertWeaverConfig, LlamaMoEConfig, MLPMoEConfig, MoEficationConfig, PruneConfig  # noqa: E402
from .models.checkpoint import load, load_model, save  # noqa: E402
from .pipeline.convert import convert  # noqa: E402
from .pipeline.streaming import convert_streaming  # noqa: E402

__all__ = [
    "AssetError",
    "CMoEConfig",
    "Calibration",
    "ExpertWeaverConfig",
    "FinetuneConfig",
    "InputError",
    "LayerPlan",
    "LayerResult",
    "LlamaMoEConfig",
    "MLPMoEConfig",
    "MethodConfig",
    "MoEMLP",
    "MoEficationConfig",
    "MoeifyError",
    "PruneConfig",
    "config_for",
    "convert",
    "convert_streaming",
    "finetune",
    "load",
    "load_model",
    "method_names",
    "save",
]
