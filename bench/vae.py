"""Benchmark: VAE decode at growing sizes — whole image, diffusers' tiling, gigadiff exact and fast.

Each (method, size) runs in a fresh process so its peak RSS (ru_maxrss) is its own. The VAE has SD's
AutoencoderKL architecture (4 levels, GroupNorm, mid-block attention) at reduced width [8, 16, 32, 32] with
seeded random weights, so that 4096²+ decodes finish on 2 CPU cores; the latent is a real photo
(skimage astronaut) encoded with it and resized to the target size. Errors are max-abs and PSNR against the
whole-image decode where that runs. gigadiff's largest sizes stream into a tiled BigTIFF (never whole in RAM).
`--vae sd` uses SD 1.x's full VAE configuration instead ([128, 256, 512, 512], two resnets per block, 32
groups; still random weights): compute-bound like the real one, where the reduced one is memory-bound.
`--vae qwen` is Qwen-Image's VAE (AutoencoderKLQwenImage, the released layout at 1/6 of its width: base 16
instead of 96) and `--vae dcae` SANA's DC-AE f32c32 (the released layout at 1/8 of its width), both tiled by
gigadiff.vae.halo; `--tiled-only` sizes run only the tiled methods (diffusers' own tiling at its defaults, and
gigadiff's fast mode streamed to a BigTIFF), where the whole decode does not fit.
Every method runs with large CPU tensors on transparent huge pages, as gigadiff's command line sets up
(gigadiff.heap); `--no-huge-pages` measures without.

    python bench/vae.py [--sizes 1024 2048 4096] [--ours-only 8192 16384] [--vae bench|sd|qwen|dcae]
                        [--tiled-only 8192] [--no-huge-pages] [--json F]
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

METHODS = ("whole", "diffusers-tiling", "exact", "fast")
REPEATS, REPEAT_BUDGET_S = 3, 30.0


VAES = {
    "bench": {"block_out_channels": [8, 16, 32, 32], "norm_num_groups": 8, "layers_per_block": 1},
    "sd": {"block_out_channels": [128, 256, 512, 512], "norm_num_groups": 32, "layers_per_block": 2},
}


HALO_VAES = ("qwen", "dcae")
WIDTHS = (16, 32, 64, 64, 128, 128)
"""DC-AE f32c32's stage widths (128 ... 1024) / 8."""


def bench_vae(kind: str = "bench"):
    import torch
    from diffusers import AutoencoderDC, AutoencoderKL, AutoencoderKLQwenImage

    torch.manual_seed(0)
    if kind == "qwen":  # Qwen-Image's layout (dim_mult, resnets, temporal downsampling), base width 16
        return AutoencoderKLQwenImage(base_dim=16, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2,
                                      temperal_downsample=[False, True, True]).eval()  # fmt: skip
    if kind == "dcae":  # DC-AE f32c32's layout (SANA), widths / 8
        return AutoencoderDC(
            in_channels=3, latent_channels=32, attention_head_dim=8,
            encoder_block_types=("ResBlock",) * 3 + ("EfficientViTBlock",) * 3,
            decoder_block_types=("ResBlock",) * 3 + ("EfficientViTBlock",) * 3,
            encoder_block_out_channels=WIDTHS, decoder_block_out_channels=WIDTHS,
            encoder_layers_per_block=(2, 2, 2, 3, 3, 3), decoder_layers_per_block=(3, 3, 3, 3, 3, 3),
            encoder_qkv_multiscales=((),) * 3 + ((5,),) * 3, decoder_qkv_multiscales=((),) * 3 + ((5,),) * 3,
            downsample_block_type="pixel_unshuffle", upsample_block_type="pixel_shuffle", decoder_norm_types="rms_norm",
            decoder_act_fns="silu", scaling_factor=0.41407,
        ).eval()  # fmt: skip
    return AutoencoderKL(down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
                         latent_channels=4, **VAES[kind]).eval()  # fmt: skip


def factor_of(kind: str) -> int:
    return 32 if kind == "dcae" else 8


def raw_decode(vae, kind: str, z):
    """The VAE's own decode of its own latents (diffusers' tiling when enabled), [B, 3, H, W] in [-1, 1]."""
    if kind == "qwen":
        return vae.decode(z[:, :, None], return_dict=False)[0][:, :, 0]
    return vae.decode(z, return_dict=False)[0].clamp(-1, 1)


def latent_for(vae, size: int, kind: str = "bench"):
    import torch
    import torch.nn.functional as F
    from skimage import data

    from gigadiff.vae.latents import scale_latents

    img = torch.from_numpy(data.astronaut()).permute(2, 0, 1)[None].float() / 127.5 - 1
    with torch.no_grad():
        if kind == "qwen":
            z = vae.encode(img[:, :, None]).latent_dist.mode()[:, :, 0]
        elif kind == "dcae":
            z = vae.encode(img).latent
        else:
            z = vae.encode(img).latent_dist.mean
    f = factor_of(kind)
    return scale_latents(vae, F.interpolate(z, size=(size // f, size // f), mode="bilinear"))


def gigadiff_tiled(vae, kind: str, method: str):
    """gigadiff's tiled decoder for the bench VAE: TiledVAE, or the halo passes for Qwen-Image's VAE / DC-AE."""
    from gigadiff.vae.tiled import TiledVAE, VaeTiling

    if kind not in HALO_VAES:
        return TiledVAE(vae, VaeTiling(mode=method))  # type: ignore[arg-type]
    from gigadiff.backends.qwen_image import qwen_vae_networks
    from gigadiff.backends.sana import dc_ae_networks
    from gigadiff.vae.halo import HaloTiledVAE

    networks = qwen_vae_networks(vae) if kind == "qwen" else dc_ae_networks(vae)
    return HaloTiledVAE(vae, *networks, VaeTiling(mode=method))  # type: ignore[arg-type]


def one(method: str, size: int, ref: Path | None, out: Path, kind: str, huge_pages: bool) -> dict:
    """Runs in the child: decode once, report time, peak RSS and the error against a saved whole decode."""
    from gigadiff.heap import use_huge_pages

    if huge_pages:
        use_huge_pages()
    import numpy as np
    import torch

    from gigadiff.io.streaming import write_streamed
    from gigadiff.vae.latents import unscale_latents

    torch.set_num_threads(2)
    vae = bench_vae(kind)
    z = latent_for(vae, size, kind)
    if method == "diffusers-tiling":  # SD's settings: 512 px tiles, 25% overlap; the other VAEs' own defaults
        vae.enable_tiling()
        if kind not in HALO_VAES:
            vae.tile_sample_min_size, vae.tile_latent_min_size = 512, 64
    tiled = gigadiff_tiled(vae, kind, method) if method in ("exact", "fast") else None

    def decode():
        if tiled is None:
            with torch.no_grad():
                return raw_decode(vae, kind, unscale_latents(vae, z))
        if out.suffix == ".tif":
            write_streamed(lambda sink: tiled.decode(z, sink), out, size, size, {"bench": True}, overwrite=True)
            return None
        return tiled.decode(z)

    times = []  # the best of up to REPEATS runs (while they take under REPEAT_BUDGET_S together): this machine's
    while len(times) < REPEATS and sum(times) < REPEAT_BUDGET_S:  # timings wander by 20% from run to run
        image = None  # freed before the next run, so that peak RSS stays one decode's
        start = time.perf_counter()
        image = decode()
        times.append(time.perf_counter() - start)
    seconds = min(times)
    row = {"method": method, "size": size, "seconds": round(seconds, 2), "runs": len(times),
           "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2, 3)}  # fmt: skip
    if image is not None and method == "whole" and ref is not None:
        np.save(ref, image.numpy())
    elif image is not None and ref is not None and ref.exists():
        whole = torch.from_numpy(np.load(ref))
        mse = float(((image - whole) ** 2).mean())
        row["max_abs_err"] = round(float((image - whole).abs().max()), 6)
        row["psnr_db"] = round(10 * math.log10(4 / mse), 1) if mse > 0 else math.inf
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="*", default=[1024, 2048, 4096])
    parser.add_argument("--ours-only", type=int, nargs="*", default=[8192, 16384])
    parser.add_argument("--tiled-only", type=int, nargs="*", default=[], help="sizes for the tiled methods only")
    parser.add_argument("--methods", nargs="*", default=list(METHODS), choices=METHODS)
    parser.add_argument("--vae", choices=sorted(VAES) + list(HALO_VAES), default="bench")
    parser.add_argument("--no-huge-pages", action="store_true", help="without gigadiff.heap's huge pages")
    parser.add_argument("--json", type=Path, default=Path("bench/results/vae.json"))
    parser.add_argument("--one", nargs=4, metavar=("METHOD", "SIZE", "REF", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        method, size, ref, out = args.one
        ref_path = Path(ref) if ref != "-" else None
        print(json.dumps(one(method, int(size), ref_path, Path(out), args.vae, not args.no_huge_pages)))
        return
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        plan = [(m, s, ".npy") for s in args.sizes for m in METHODS if m in args.methods]
        plan += [(m, s, ".tif") for s in args.ours_only for m in ("fast",)]
        tiled = ("diffusers-tiling", "fast")
        plan += [(m, s, ".npy" if m != "fast" else ".tif") for s in args.tiled_only for m in tiled]
        for method, size, kind in plan:
            ref = Path(tmp) / f"whole{size}.npy"
            out = Path(tmp) / f"{method}{size}.tif"
            cmd = [sys.executable, __file__, "--vae", args.vae, "--one", method, str(size),
                   str(ref) if kind == ".npy" else "-", str(out) if kind == ".tif" else "-"]  # fmt: skip
            cmd += ["--no-huge-pages"] if args.no_huge_pages else []
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                why = (proc.stderr.strip().splitlines() or [f"exit code {proc.returncode}"])[-1][:120]
                row = {"method": method, "size": size, "failed": why}
            else:
                row = json.loads(proc.stdout.strip().splitlines()[-1])
            rows.append(row)
            print(_line(row), flush=True)
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(rows, indent=1) + "\n")  # after every row: a long run keeps its rows
    print(f"wrote {args.json}")


def _line(row: dict) -> str:
    if "failed" in row:
        return f"{row['method']:>17} {row['size']:>6}  failed: {row['failed']}"
    err = f"{row.get('max_abs_err', ''):>10} {row.get('psnr_db', ''):>7}"
    return f"{row['method']:>17} {row['size']:>6} {row['seconds']:>8.2f}s {row['peak_rss_gb']:>7.3f} GB {err}"


if __name__ == "__main__":
    main()
