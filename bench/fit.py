"""Which real models fit which GPUs at which canvas sizes, and how: the memory plan (gigadiff.runs.plan) of the
released architectures, for cards this machine does not have.

Each model is planned from its released configuration (the numbers below: block counts and widths of its
denoiser, text encoders and VAE; facts from the models' published config files), built on the `meta` device:
no weights are downloaded or allocated. The tokenizers are the tests' offline ones: the prompt is padded to the
length each pipeline uses, so the traced activations have the real shapes. For every canvas and card the table
gives the configuration whose plan fits with the fewest quantized weights, then the least offloading: the family's
dtype with nothing offloaded, the text encoders and VAE swapped in turn (`--offload model`), the denoiser quantized
to 8 bits (int8; fp8 or a Q8_0 GGUF take the same bytes), then its text encoders too (`--quantize-text`), the
same in 4 bits (nf4; Q4 GGUFs about the same), then block offloading (`--offload group`), and last layer by layer
(`--offload sequential`), each with the largest tile batch that fits (the default, else one of its divisors, as
a run picks it). A cell gives that choice and its peak while encoding and denoising (weights, activations,
canvas); the decode then takes half of what is left for the tiled VAE (the `--vae-memory` default), whatever the
canvas.

    python bench/fit.py [--quick]     # prints the table, writes bench/results/fit.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

GB = 2**30
CARDS = (8, 12, 16, 24, 80)
SIZES = (4096, 8192, 16384)
CHOICES = (("none", "none", "none"), ("model", "none", "none"), ("none", "int8", "none"), ("model", "int8", "none"),
           ("none", "int8", "int8"), ("model", "int8", "int8"), ("none", "nf4", "none"), ("model", "nf4", "none"),
           ("none", "nf4", "nf4"), ("model", "nf4", "nf4"), ("group", "none", "none"), ("group", "int8", "none"),
           ("group", "nf4", "nf4"), ("sequential", "none", "none"))  # fmt: skip
"""(offload, quantize, quantize_text): the fewest quantized weights first, then the least offloading."""


def meta(cls: type, **config: Any) -> Any:
    import torch

    with torch.device("meta"):
        return cls(**config)


def clip_l(projection: bool = False) -> Any:
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                            max_position_embeddings=77, vocab_size=49408, projection_dim=768,
                            hidden_act="quick_gelu")  # fmt: skip
    return meta(CLIPTextModelWithProjection if projection else CLIPTextModel, config=config)


def clip_g() -> Any:
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    config = CLIPTextConfig(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                            max_position_embeddings=77, vocab_size=49408, projection_dim=1280,
                            hidden_act="gelu")  # fmt: skip
    return meta(CLIPTextModelWithProjection, config=config)


def t5_xxl() -> Any:
    from transformers import T5Config, T5EncoderModel

    config = T5Config(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
                      feed_forward_proj="gated-gelu", decoder_start_token_id=0, pad_token_id=0,
                      eos_token_id=1)  # fmt: skip
    return meta(T5EncoderModel, config=config)


def kl_vae(latent_channels: int, quant_conv: bool) -> Any:
    from diffusers import AutoencoderKL

    return meta(AutoencoderKL, in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
                latent_channels=latent_channels, use_quant_conv=quant_conv, use_post_quant_conv=quant_conv,
                sample_size=1024)  # fmt: skip


def flux1_dev() -> dict[str, Any]:
    from diffusers import FluxTransformer2DModel

    return {
        "transformer": meta(FluxTransformer2DModel, patch_size=1, in_channels=64, num_layers=19, num_single_layers=38,
                            attention_head_dim=128, num_attention_heads=24, joint_attention_dim=4096,
                            pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=(16, 56, 56)),
        "text_encoder": clip_l(), "text_encoder_2": t5_xxl(), "vae": kl_vae(16, False),
    }  # fmt: skip


def flux2_dev() -> dict[str, Any]:
    from diffusers import AutoencoderKLFlux2, Flux2Transformer2DModel
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration

    config = Mistral3Config(
        text_config={"model_type": "mistral", "vocab_size": 131072, "hidden_size": 5120, "intermediate_size": 32768,
                     "max_position_embeddings": 131072, "num_attention_heads": 32, "num_hidden_layers": 40,
                     "num_key_value_heads": 8, "head_dim": 128, "rms_norm_eps": 1e-5, "sliding_window": None},
        vision_config={"model_type": "pixtral", "hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16,
                       "intermediate_size": 4096, "image_size": 1540, "patch_size": 14, "num_channels": 3},
        image_token_index=10,
    )  # fmt: skip
    return {"transformer": meta(Flux2Transformer2DModel), "vae": meta(AutoencoderKLFlux2),
            "text_encoder": meta(Mistral3ForConditionalGeneration, config=config)}  # fmt: skip


def qwen_image() -> dict[str, Any]:
    from diffusers import AutoencoderKLQwenImage, QwenImageTransformer2DModel
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    config = Qwen2_5_VLConfig(
        text_config={"hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
                     "num_attention_heads": 28, "num_key_value_heads": 4, "rope_theta": 1000000.0,
                     "vocab_size": 152064,
                     "rope_scaling": {"mrope_section": [16, 24, 24], "rope_type": "default", "type": "default"}},
        vision_config={"depth": 32, "hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16,
                       "out_hidden_size": 3584},
        hidden_size=3584, vocab_size=152064,
    )  # fmt: skip
    return {"transformer": meta(QwenImageTransformer2DModel), "vae": meta(AutoencoderKLQwenImage),
            "text_encoder": meta(Qwen2_5_VLForConditionalGeneration, config=config)}  # fmt: skip


def sd35_large() -> dict[str, Any]:
    from diffusers import SD3Transformer2DModel

    transformer = meta(SD3Transformer2DModel, sample_size=128, patch_size=2, in_channels=16, out_channels=16,
                       num_layers=38, attention_head_dim=64, num_attention_heads=38, joint_attention_dim=4096,
                       caption_projection_dim=2432, pooled_projection_dim=2048, pos_embed_max_size=192,
                       qk_norm="rms_norm")  # fmt: skip
    return {"transformer": transformer, "text_encoder": clip_l(projection=True), "text_encoder_2": clip_g(),
            "text_encoder_3": t5_xxl(), "vae": kl_vae(16, False)}  # fmt: skip


def sdxl() -> dict[str, Any]:
    from diffusers import UNet2DConditionModel

    unet = meta(UNet2DConditionModel, sample_size=128, in_channels=4, out_channels=4, layers_per_block=2,
                block_out_channels=(320, 640, 1280),
                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                attention_head_dim=(5, 10, 20), transformer_layers_per_block=(1, 2, 10), use_linear_projection=True,
                cross_attention_dim=2048, addition_embed_type="text_time", addition_time_embed_dim=256,
                projection_class_embeddings_input_dim=2816)  # fmt: skip
    return {"unet": unet, "text_encoder": clip_l(), "text_encoder_2": clip_g(), "vae": kl_vae(4, True)}


def z_image_turbo() -> dict[str, Any]:
    from diffusers import ZImageTransformer2DModel
    from transformers import Qwen3Config, Qwen3Model

    config = Qwen3Config(vocab_size=151936, hidden_size=2560, intermediate_size=9728, num_hidden_layers=36,
                         num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=40960,
                         tie_word_embeddings=True)  # fmt: skip
    return {"transformer": meta(ZImageTransformer2DModel), "text_encoder": meta(Qwen3Model, config=config),
            "vae": kl_vae(16, False)}  # fmt: skip


@dataclass(frozen=True)
class Model:
    name: str
    tiny: str
    """The tests' tiny pipeline whose tokenizers, scheduler and model index the released configs replace."""
    released: Any
    options: dict[str, Any]
    """What the model's card runs it with (steps do not change memory)."""


MODELS = (
    Model("FLUX.1-dev", "flux", flux1_dev, {"guidance": 3.5}),
    Model("FLUX.2-dev", "flux2", flux2_dev, {"guidance": 4.0}),
    Model("Qwen-Image", "qwen_image", qwen_image, {"guidance": 4.0, "negative": " "}),
    Model("SD3.5 Large", "sd3", sd35_large, {"guidance": 3.5}),
    Model("SDXL", "sdxl", sdxl, {"guidance": 5.0}),
    Model("Z-Image-Turbo", "z_image", z_image_turbo, {"guidance": 0.0}),
)


def released_folder(model: Model, root: Path) -> Path:
    """The tiny pipeline saved with each module's config replaced by the released one (its weights stay tiny: a
    plan reads configs only)."""
    from tests.helpers import tiny

    folder = tiny.save_tiny(getattr(tiny, f"tiny_{model.tiny}_pipeline")(), root / model.tiny)
    for name, module in model.released().items():
        config = module.config
        if hasattr(config, "save_pretrained"):
            config.save_pretrained(folder / name)
        else:
            module.save_config(folder / name)
    return folder


def footprint(folder: Path, model: Model, size: int, quantize: str, quantize_text: str) -> Any:
    from gigadiff.options import RunRequest
    from gigadiff.runs.plan import footprint
    from gigadiff.runs.resolve import resolve

    request = RunRequest(prompt="a lighthouse on a cliff above a stormy sea at dusk", model=str(folder),
                         size=f"{size}x{size}", steps=28, seed=1, device="cuda", quantize=quantize,
                         quantize_text=quantize_text, **model.options)  # fmt: skip
    return footprint(resolve(request, writes=False), "cuda")


def choose(prints: dict[tuple[str, str], Any], card: int) -> dict[str, Any] | None:
    """The first (offload, quantize, quantize_text) whose plan fits `card` GB, as CHOICES orders them, with the
    largest tile batch that fits (the default or one of its divisors, as a run picks it)."""
    free = card * GB
    for offload, quantize, text in CHOICES:
        plan = prints[(quantize, text)].fitting(free, offload, lower_batch=True)
        if plan.fits():
            phases = {p.name: p.device / GB for p in plan.phases}
            return {"offload": offload, "quantize": quantize, "quantize_text": text, "tile_batch": plan.tile_batch,
                    "dtype": plan.dtype, "phases_gb": phases, "model_gb": max(phases["encode"], phases["denoise"]),
                    "vae_gb": plan.vae_work / GB}  # fmt: skip
    return None


def label(choice: dict[str, Any] | None, gb: bool = True) -> str:
    if choice is None:
        return "no"
    parts = [choice["dtype"] if choice["quantize"] == "none" else choice["quantize"]]
    if choice["quantize_text"] != "none":
        parts.append(f"text {choice['quantize_text']}")
    if choice["offload"] != "none":
        parts.append(f"offload {choice['offload']}")
    if not gb:
        return ", ".join(parts)
    parts.append(f"b{choice['tile_batch']}")
    return f"{', '.join(parts)} ({choice['model_gb']:.1f} GB)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="4096² only")
    args = parser.parse_args()
    from gigadiff.backends.pipelines import quiet_libraries

    quiet_libraries()
    sizes = SIZES[:1] if args.quick else SIZES
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for model in MODELS:
            folder = released_folder(model, Path(tmp))
            for size in sizes:
                start = time.perf_counter()
                pairs = dict.fromkeys((q, t) for _, q, t in CHOICES)
                prints = {(q, t): footprint(folder, model, size, q, t) for q, t in pairs}
                base = prints[("none", "none")]
                weights = {name: size_ / GB for name, size_ in base.held.weights.items()}
                row = {"model": model.name, "size": size, "dtype": base.dtype, "weights_gb": weights,
                       "activations_gb": {str(b): v / GB for b, v in base.activations.items()},
                       "canvas_gb": base.canvas / GB, "whole_decode_gb": base.whole_decode / GB,
                       "cards": {str(card): choose(prints, card) for card in CARDS}}  # fmt: skip
                rows.append(row)
                cells = "  ".join(f"{card} GB: {label(row['cards'][str(card)])}" for card in CARDS)
                took = time.perf_counter() - start
                print(f"{model.name:<14} {size:>5}²  weights {sum(weights.values()):5.1f} GB  canvas "
                      f"{row['canvas_gb']:.2f} GB  ({took:.0f} s)\n    {cells}", flush=True)  # fmt: skip
    results = ROOT / "bench" / "results"
    results.mkdir(exist_ok=True)
    (results / "fit.json").write_text(json.dumps({"cards_gb": CARDS, "rows": rows}, indent=1))
    print("\n| model | canvas | " + " | ".join(f"{c} GB" for c in CARDS) + " |")
    print("| --- | --- | " + " | ".join("---" for _ in CARDS) + " |")
    for row in rows:
        cells = " | ".join(label(row["cards"][str(card)]) for card in CARDS)
        print(f"| {row['model']} | {row['size']}² | {cells} |")
    print("\n| model (16384²) | " + " | ".join(f"{c} GB" for c in CARDS) + " |")
    print("| --- | " + " | ".join("---" for _ in CARDS) + " |")
    for row in rows:
        if row["size"] == SIZES[-1]:
            print(f"| {row['model']} | " + " | ".join(label(row["cards"][str(c)], gb=False) for c in CARDS) + " |")


if __name__ == "__main__":
    main()
