"""The vLLM suite (`make test-vllm`): runs in the vLLM environment (.venv-vllm); every test module skips without vLLM.

Not collected by the main suite (pyproject testpaths = ["tests"]).
"""

from __future__ import annotations

import os

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
