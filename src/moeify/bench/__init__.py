"""Speed and memory of converted models (`moeify bench`), protocol.md "Speed".

Modules (each imports only the ones listed before it, and moeify's lower layers):

* `stats`: medians, spread, speedups next to their limits;
* `cost`: what a token costs (weights read, matmul FLOPs), the decode bytes and
  prefill FLOP limits, the attainable (Amdahl) limit, weight bytes;
* `timing`: the benchmark inputs, one run of a workload, dense vs converted
  interleaved (`compare_models`), the device's name;
* `memory`: peak memory in a fresh child process (`python -m moeify.bench --peak ...`);
* `layer`: one MoE layer vs its dense MLP on random weights, with skewed routing.
"""

from .cost import (
    TokenCost,
    attainable_limit,
    cost_summary,
    mlp_modules,
    moe_active_params,
    token_cost,
    weight_bytes,
)
from .layer import SKEW_BETA, SkewedRouter, build_layer, compare_layer
from .memory import peak_memory_child
from .stats import speedup, summarize
from .timing import (
    WORKLOADS,
    SkipMLPs,
    bench_inputs,
    check_workloads,
    compare_models,
    device_name,
    kernel_summary,
    run_decode,
    run_prefill,
    run_workload,
)

__all__ = [
    "SKEW_BETA",
    "WORKLOADS",
    "SkewedRouter",
    "SkipMLPs",
    "TokenCost",
    "attainable_limit",
    "bench_inputs",
    "build_layer",
    "check_workloads",
    "compare_layer",
    "compare_models",
    "cost_summary",
    "device_name",
    "kernel_summary",
    "mlp_modules",
    "moe_active_params",
    "peak_memory_child",
    "run_decode",
    "run_prefill",
    "run_workload",
    "speedup",
    "summarize",
    "token_cost",
    "weight_bytes",
]
