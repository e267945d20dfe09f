"""The memory plan (gigadiff.runs.plan) against measured peaks, per phase, on the CPU.

For FLUX.1, SDXL and Qwen-Image, each as its tiny test pipeline and as a wider one (the denoiser at real block
widths with few blocks, the tiny text encoders and VAE), at three canvas sizes and two tile batches: the plan is
made in this process from the saved model's config files; the run happens in a fresh process that reads its
resident set before loading and its peak (VmHWM, reset through /proc/self/clear_refs at each phase) in the
encode, denoise and decode phases. On the CPU the plan's device is the process: a phase's prediction is what
the run adds to the memory the process held before loading.

    python bench/memory.py [--quick]      # prints a table, writes bench/results/memory.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CHILD = r"""
import json, sys
from pathlib import Path

def status(key):
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key):
            return int(line.split()[1]) * 1024
    raise KeyError(key)

def reset():
    Path("/proc/self/clear_refs").write_text("5")

import torch
from gigadiff.api import generate_result, open_backend
from gigadiff.backends.pipelines import quiet_libraries
quiet_libraries()
folder, size, batch = sys.argv[1], sys.argv[2], int(sys.argv[3])
width, height = (int(v) for v in size.split("x"))
before = status("VmRSS")
backend = open_backend(folder, "cpu")
loaded = status("VmRSS") - before
peaks = {}
reset()
backend.condition("a harbour at dusk", "", 4.0, (height, width), {})
peaks["encode"] = status("VmHWM") - before
reset()
result = generate_result("a harbour at dusk", model=backend, size=size, steps=2, seed=1, tile_batch=batch, guidance=4.0)
peaks["denoise"] = status("VmHWM") - before
reset()
result.decode()
peaks["decode"] = status("VmHWM") - before
print(json.dumps({"loaded": loaded, "peaks": peaks}))
"""


def wide_flux():
    import torch
    from diffusers import FluxTransformer2DModel

    from tests.helpers.tiny import tiny_flux_pipeline

    pipe = tiny_flux_pipeline()
    torch.manual_seed(0)
    pipe.transformer = FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=2, num_single_layers=2,
                                              attention_head_dim=128, num_attention_heads=6, joint_attention_dim=32,
                                              pooled_projection_dim=32, guidance_embeds=True,
                                              axes_dims_rope=(16, 56, 56)).eval()  # fmt: skip
    return pipe


def wide_sdxl():
    import torch
    from diffusers import UNet2DConditionModel

    from tests.helpers.tiny import tiny_sdxl_pipeline

    pipe = tiny_sdxl_pipeline()
    torch.manual_seed(0)
    pipe.unet = UNet2DConditionModel(
        sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(5, 10), use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=256, transformer_layers_per_block=(1, 2), cross_attention_dim=64,
        projection_class_embeddings_input_dim=6 * 256 + 32, norm_num_groups=32,
    ).eval()  # fmt: skip
    return pipe


def wide_qwen_image():
    import torch
    from diffusers import QwenImageTransformer2DModel

    from tests.helpers.tiny import tiny_qwen_image_pipeline

    pipe = tiny_qwen_image_pipeline()
    torch.manual_seed(0)
    pipe.transformer = QwenImageTransformer2DModel(patch_size=2, in_channels=16, out_channels=4, num_layers=3,
                                                   attention_head_dim=128, num_attention_heads=6,
                                                   joint_attention_dim=16, guidance_embeds=False,
                                                   axes_dims_rope=(16, 56, 56)).eval()  # fmt: skip
    return pipe


def tiny(name):
    from tests.helpers import tiny as helpers

    return getattr(helpers, f"tiny_{name}_pipeline")()


CONFIGS = {
    "flux tiny": lambda: tiny("flux"), "flux wide": wide_flux,
    "sdxl tiny": lambda: tiny("sdxl"), "sdxl wide": wide_sdxl,
    "qwen-image tiny": lambda: tiny("qwen_image"), "qwen-image wide": wide_qwen_image,
}  # fmt: skip
SIZES = ("512x512", "1024x512", "1024x1024")
BATCHES = (1, 2)


def plan_for(folder: Path, size: str, batch: int):
    from gigadiff.options import RunRequest
    from gigadiff.runs.plan import plan_run
    from gigadiff.runs.resolve import resolve

    request = RunRequest(prompt="a harbour at dusk", model=str(folder), size=size, steps=2, seed=1, device="cpu",
                         tile_batch=batch, guidance=4.0)  # fmt: skip
    return plan_run(resolve(request, writes=False))


def measure(folder: Path, size: str, batch: int) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, str(folder), size, str(batch)], capture_output=True,
                         text=True, check=True, cwd=ROOT)  # fmt: skip
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one size and one batch per configuration")
    args = parser.parse_args()
    from tests.helpers.tiny import save_tiny

    sizes, batches = (SIZES[:1], BATCHES[:1]) if args.quick else (SIZES, BATCHES)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, build in CONFIGS.items():
            folder = save_tiny(build(), Path(tmp) / name.replace(" ", "-"))
            for size in sizes:
                for batch in batches:
                    plan = plan_for(folder, size, batch)
                    measured = measure(folder, size, batch)
                    for phase in plan.phases:
                        got = measured["peaks"][phase.name]
                        rows.append({"config": name, "size": size, "tile_batch": batch, "phase": phase.name,
                                     "predicted_mb": phase.device / 2**20, "measured_mb": got / 2**20,
                                     "error": phase.device / got - 1 if got > 0 else None})  # fmt: skip
                        r = rows[-1]
                        print(
                            f"{name:<16} {size:>9} b{batch} {phase.name:<8} predicted {r['predicted_mb']:8.1f} MB"
                            f"  measured {r['measured_mb']:8.1f} MB  {100 * (r['error'] or 0):+6.1f}%",
                            flush=True,
                        )
    worst = max(abs(r["error"]) for r in rows if r["error"] is not None)
    print(f"\nworst relative error: {100 * worst:.1f}% over {len(rows)} phases")
    results = ROOT / "bench" / "results"
    results.mkdir(exist_ok=True)
    (results / "memory.json").write_text(json.dumps({"rows": rows, "worst_error": worst}, indent=1))


if __name__ == "__main__":
    main()
