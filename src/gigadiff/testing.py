"""Tiny diffusers pipelines with seeded random weights, for tests and CPU benchmarks.

They use the real diffusers/transformers classes with miniature configs, so they exercise exactly the code a
hub model takes (save_pretrained -> from_pretrained -> encode_prompt -> UNet -> VAE). Their pictures are
noise-like: they are never a demo. The tokenizer is a byte-level CLIP BPE with no merges, built offline.

Proportions matter for benchmarks: the tiny SD's UNet is sized so that 4 guided steps on a tile cost about
twice one VAE decode of that tile, as for Stable Diffusion 1.5 at few steps (its UNet is ~0.4 TFLOP per
evaluation at 512², its VAE decoder ~1.2 TFLOP); with a smaller UNet the fixed VAE cost would dominate and
any tiling strategy would look alike.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

TINY_NATIVE_LATENT = 64  # 512 px with the 8x VAE, like SD 1.5


_UNET_COMMON: dict[str, Any] = {
    "layers_per_block": 1,
    "sample_size": TINY_NATIVE_LATENT,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"),
    "norm_num_groups": 4,
}


def tiny_tokenizer() -> Any:
    from transformers import CLIPTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    chars = list(bytes_to_unicode().values())
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for suffix in ("", "</w>"):
        for c in chars:
            vocab[c + suffix] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)


def _text_config() -> Any:
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
        hidden_size=32,
        intermediate_size=37,
        num_attention_heads=4,
        num_hidden_layers=2,
        vocab_size=600,
        projection_dim=32,
    )


def tiny_vae() -> Any:
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        block_out_channels=[4, 4, 4, 4],
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * 4,
        up_block_types=["UpDecoderBlock2D"] * 4,
        latent_channels=4,
        norm_num_groups=2,
        layers_per_block=1,
        sample_size=TINY_NATIVE_LATENT * 8,
    )


def _scheduler(prediction_type: str) -> Any:
    from diffusers import DDIMScheduler

    return DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type=prediction_type,
    )


def tiny_sd_pipeline(seed: int = 0, prediction_type: str = "epsilon") -> Any:
    """A Stable Diffusion 1.x/2.x-shaped pipeline (v-prediction with prediction_type="v_prediction")."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        **_UNET_COMMON, block_out_channels=(32, 64), cross_attention_dim=32, attention_head_dim=4
    )
    return StableDiffusionPipeline(
        vae=tiny_vae(),
        text_encoder=CLIPTextModel(_text_config()),
        tokenizer=tiny_tokenizer(),
        unet=unet,
        scheduler=_scheduler(prediction_type),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def tiny_sdxl_pipeline(seed: int = 0) -> Any:
    """An SDXL-shaped pipeline: two text encoders, pooled embeddings and micro-conditioning time ids."""
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        **_UNET_COMMON,
        block_out_channels=(8, 16),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 1),
        projection_class_embeddings_input_dim=6 * 8 + 32,
        cross_attention_dim=64,
    )
    return StableDiffusionXLPipeline(
        vae=tiny_vae(),
        text_encoder=CLIPTextModel(_text_config()),
        text_encoder_2=CLIPTextModelWithProjection(_text_config()),
        tokenizer=tiny_tokenizer(),
        tokenizer_2=tiny_tokenizer(),
        unet=unet,
        scheduler=_scheduler("epsilon"),
    )


def save_tiny(pipe: Any, folder: str | Path) -> Path:
    """Save like a hub model (model_index.json + component folders) so it loads through from_pretrained."""
    folder = Path(folder)
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder
