"""Batch-1 decode with every kernel held to AVX2, on a machine that has more (AVX-512, AVX512-BF16, AMX).

The brief's machine has AVX2 only (no AVX-512, no bf16 units); sessions may get a faster CPU. This
runs `moeify bench` with ATen, oneDNN and MKL held to AVX2 (`ATEN_CPU_CAPABILITY=avx2
ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2`, set before torch loads) and moeify's
compiled decode step built for Haswell (`-march=haswell`: AVX2 + FMA, no AVX-512), so that
dense and converted run the code an AVX2 CPU runs. The memory system stays this machine's,
so this shows the instruction-set effect, not the AVX2 machine's timings. Everything after
the script's own options is passed to `moeify bench`:

    python benchmarks/avx2_decode.py out/smollm2-cmoe-s3a3e8 --dtype bfloat16 --workloads decode \\
        --repeats 7 --no-memory --json benchmarks/results/speed_smollm2_s3a3e8_bfloat16_decode_avx2.json
"""

from __future__ import annotations

import os
import sys

os.environ.update(ATEN_CPU_CAPABILITY="avx2", ONEDNN_MAX_CPU_ISA="AVX2", MKL_ENABLE_INSTRUCTIONS="AVX2")

import torch  # noqa: E402

from moeify.cli import main  # noqa: E402
from moeify.kernels import native  # noqa: E402

native.FLAGS = tuple("-march=haswell" if f == "-march=native" else f for f in native.FLAGS)

if __name__ == "__main__":
    assert torch.backends.cpu.get_cpu_capability() == "AVX2", torch.backends.cpu.get_cpu_capability()
    sys.argv = ["moeify", "bench", *sys.argv[1:]]
    main()
