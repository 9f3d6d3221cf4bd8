"""Checkpoint merger: peak memory of one merge against the size of one input model.

    python bench/merge_memory.py                  # two 256 MiB float32 "models" of 64 tensors
    python bench/merge_memory.py --mib 1024 --tensors 200

Writes two (or three) synthetic single-file `.safetensors` models to a temporary folder and
merges them with the app's own writer (`pipelines.models.merge.write_merged`, the part that
streams; names and families are checked before it and cost nothing), each method in a fresh
subprocess whose peak RSS (VmHWM, reset just before the merge) is its own. Mapped file pages
count too, so this is what `top` would show. Printed, never asserted.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

CHILD = r"""
import json, sys
from pathlib import Path
import torch  # before the peak is reset: its import is no part of the merge
from pipelines.core.merge_request import MergeRequest
from pipelines.models.checkpoint_file import read_header
from pipelines.models.merge import MergePlan, write_merged

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024

folder, method, half = Path(sys.argv[1]), sys.argv[2], sys.argv[3] == "1"
names = {"Weighted sum": "ab", "Add difference": "abc", "No interpolation": "a"}[method]
headers = [read_header(folder / f"{n}.safetensors") for n in names]
request = MergeRequest("a", "b", "c", interp_method=method, multiplier=0.3, save_as_half=half)
plan = MergePlan(request, headers, folder / "out.safetensors")
open("/proc/self/clear_refs", "w").write("5")  # reset VmHWM to the current RSS
before = status("VmRSS")
write_merged(plan, {})
print(json.dumps({"before": before, "peak": status("VmHWM")}))
"""


def write_model(path: Path, mib: int, tensors: int, seed: int) -> int:
    import torch
    from safetensors.torch import save_file

    per = mib * (1 << 20) // 4 // tensors
    side = int(per ** 0.5)
    gen = torch.Generator().manual_seed(seed)
    state = {f"model.diffusion_model.block{i}.weight": torch.randn(side, side, generator=gen) for i in range(tensors)}
    save_file(state, str(path))
    return path.stat().st_size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mib", type=int, default=256, help="size of each input model (float32)")
    parser.add_argument("--tensors", type=int, default=64)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        size = 0
        for seed, name in enumerate("abc"):
            size = write_model(folder / f"{name}.safetensors", args.mib, args.tensors, seed)
        largest = size // args.tensors
        print(f"input model: {size / 2**20:.0f} MiB in {args.tensors} tensors (largest {largest / 2**20:.1f} MiB)")
        print(f"{'method':<18} {'output':<8} {'peak over start':>16} {'x model size':>13}")
        for method in ("Weighted sum", "Add difference", "No interpolation"):
            for half in (True, False):
                done = subprocess.run([sys.executable, "-c", CHILD, str(folder), method, "1" if half else "0"],
                                      capture_output=True, text=True, cwd=ROOT, check=True)
                numbers = json.loads(done.stdout.strip().splitlines()[-1])
                grown = numbers["peak"] - numbers["before"]
                print(f"{method:<18} {'fp16' if half else 'fp32':<8} {grown / 2**20:>12.0f} MiB {grown / size:>13.2f}")


if __name__ == "__main__":
    main()
