"""Tiny diffusers pipelines of every family with seeded random weights, for tests and CPU benchmarks.

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


def evaluating(pipe: Any) -> Any:
    """The pipeline with every module in inference mode, as `from_pretrained` leaves it (a freshly built text
    encoder is in training mode: its dropout would draw random numbers)."""
    for component in pipe.components.values():
        if hasattr(component, "eval"):
            component.eval()
    return pipe


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
    return evaluating(
        StableDiffusionPipeline(
            vae=tiny_vae(),
            text_encoder=CLIPTextModel(_text_config()),
            tokenizer=tiny_tokenizer(),
            unet=unet,
            scheduler=_scheduler(prediction_type),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
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
    return evaluating(
        StableDiffusionXLPipeline(
            vae=tiny_vae(),
            text_encoder=CLIPTextModel(_text_config()),
            text_encoder_2=CLIPTextModelWithProjection(_text_config()),
            tokenizer=tiny_tokenizer(),
            tokenizer_2=tiny_tokenizer(),
            unet=unet,
            scheduler=_scheduler("epsilon"),
        )
    )


def save_tiny(pipe: Any, folder: str | Path) -> Path:
    """Save like a hub model (model_index.json + component folders) so it loads through from_pretrained."""
    folder = Path(folder)
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


def tiny_t5_tokenizer() -> Any:
    """A character-level T5 tokenizer (unigram over printable characters), built offline."""
    import string

    from transformers import T5TokenizerFast

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -1.0)]
    vocab += [(c, -2.0) for c in string.printable[:94]]
    return T5TokenizerFast(vocab=vocab, extra_ids=0)


CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{{ m['content'][0]['text'] }}{% endif %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and not enable_thinking %}<think>\n\n</think>\n\n{% endif %}{% endif %}"
)
"""A Qwen-style chat template (roles between <|im_start|> and <|im_end|>; text or a list of text parts)."""


def tiny_chat_tokenizer() -> Any:
    """A byte-level BPE tokenizer with no merges and a Qwen-style chat template, built offline (Qwen2/3 text
    encoders; FLUX.2's Mistral prompt format works through the same template)."""
    from transformers import Qwen2TokenizerFast
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    vocab = {c: i for i, c in enumerate(bytes_to_unicode().values())}
    for special in ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"):
        vocab[special] = len(vocab)
    tokenizer = Qwen2TokenizerFast(vocab=vocab, merges=[])
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def tiny_flux_vae(latent_channels: int = 16) -> Any:
    """A FLUX-style AutoencoderKL: 16 latent channels, shift and scale factors, no quant convolutions."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        block_out_channels=[8, 8, 8, 8],
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * 4,
        up_block_types=["UpDecoderBlock2D"] * 4,
        latent_channels=latent_channels,
        norm_num_groups=4,
        layers_per_block=1,
        use_quant_conv=False,
        use_post_quant_conv=False,
        shift_factor=0.1159,
        scaling_factor=0.3611,
        sample_size=256,
    )


def _flow_scheduler(dynamic: bool = True, shift: float = 3.0) -> Any:
    from diffusers import FlowMatchEulerDiscreteScheduler

    if dynamic:
        return FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                               base_image_seq_len=256, max_image_seq_len=4096)  # fmt: skip
    return FlowMatchEulerDiscreteScheduler(shift=shift)


def tiny_flux_pipeline(seed: int = 0, guidance_embeds: bool = True) -> Any:
    """A FLUX.1-shaped pipeline: CLIP pooled + T5 prompt encoding, a 2x2-packing MMDiT, the 16-channel VAE.
    guidance_embeds=True is FLUX.1-dev's embedded guidance, False is schnell's."""
    from diffusers import FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel, T5Config, T5EncoderModel

    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=1, num_single_layers=1,
                                         attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                         pooled_projection_dim=32, guidance_embeds=guidance_embeds,
                                         axes_dims_rope=(4, 6, 6))  # fmt: skip
    t5 = T5EncoderModel(T5Config(vocab_size=200, d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
                                 decoder_start_token_id=0, pad_token_id=0, eos_token_id=1))  # fmt: skip
    return evaluating(
        FluxPipeline(
            scheduler=_flow_scheduler(dynamic=guidance_embeds, shift=1.0),  # schnell shifts nothing
            vae=tiny_flux_vae(),
            text_encoder=CLIPTextModel(_text_config()),
            tokenizer=tiny_tokenizer(),
            text_encoder_2=t5,
            tokenizer_2=tiny_t5_tokenizer(),
            transformer=transformer,
        )
    )


def _qwen3_config(layers: int = 3, **kw: Any) -> Any:
    from transformers import Qwen3Config

    return Qwen3Config(vocab_size=300, hidden_size=16, intermediate_size=37, num_hidden_layers=layers,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=4, max_position_embeddings=1024,
                       **kw)  # fmt: skip


FLUX2_TEXT_LAYERS = 31
"""FLUX.2 [dev] stacks its text encoder's hidden states 10, 20 and 30: the tiny encoder has that many layers."""
KLEIN_TEXT_LAYERS = 28
"""FLUX.2 [klein] stacks hidden states 9, 18 and 27."""


def tiny_flux2_vae() -> Any:
    """A FLUX.2-style AutoencoderKLFlux2: its latents are patchified 2x2 and normalised by BatchNorm statistics."""
    from diffusers import AutoencoderKLFlux2

    vae = AutoencoderKLFlux2(block_out_channels=(8, 8, 8, 8), latent_channels=8, norm_num_groups=4,
                             layers_per_block=1, use_quant_conv=False, use_post_quant_conv=False,
                             sample_size=256)  # fmt: skip
    generator = torch.Generator().manual_seed(1)
    vae.bn.running_mean.copy_(0.2 * torch.randn(vae.bn.running_mean.shape, generator=generator))
    vae.bn.running_var.copy_(0.5 + torch.rand(vae.bn.running_var.shape, generator=generator))
    return vae


def _flux2_transformer(in_channels: int, joint_dim: int, guidance_embeds: bool) -> Any:
    from diffusers import Flux2Transformer2DModel

    return Flux2Transformer2DModel(patch_size=1, in_channels=in_channels, num_layers=1, num_single_layers=1,
                                   attention_head_dim=16, num_attention_heads=2, joint_attention_dim=joint_dim,
                                   timestep_guidance_channels=256, axes_dims_rope=(4, 4, 4, 4),
                                   guidance_embeds=guidance_embeds)  # fmt: skip


def tiny_flux2_pipeline(seed: int = 0) -> Any:
    """A FLUX.2 [dev]-shaped pipeline: a Mistral3 text encoder's stacked hidden states, embedded guidance, the
    patchified, BatchNorm-normalised latents of AutoencoderKLFlux2. Its tokenizer is a chat-template tokenizer
    (the real model's Pixtral processor needs torchvision; the prompt format is the same)."""
    from diffusers import Flux2Pipeline
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration

    torch.manual_seed(seed)
    config = Mistral3Config(
        text_config={"model_type": "mistral", "vocab_size": 300, "hidden_size": 16, "intermediate_size": 37,
                     "max_position_embeddings": 1024, "num_attention_heads": 4, "num_hidden_layers": FLUX2_TEXT_LAYERS,
                     "num_key_value_heads": 2, "head_dim": 4, "rms_norm_eps": 1e-5, "sliding_window": None,
                     "bos_token_id": 2, "eos_token_id": 3, "pad_token_id": 4},
        vision_config={"model_type": "pixtral", "hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 4,
                       "intermediate_size": 37, "image_size": 30, "patch_size": 6, "num_channels": 3},
        image_token_index=1,
    )  # fmt: skip
    return evaluating(
        Flux2Pipeline(
            scheduler=_flow_scheduler(),
            vae=tiny_flux2_vae(),
            text_encoder=Mistral3ForConditionalGeneration(config),
            tokenizer=tiny_chat_tokenizer(),
            transformer=_flux2_transformer(32, 3 * 16, guidance_embeds=True),
        )
    )


def tiny_flux2_klein_pipeline(seed: int = 0, distilled: bool = False) -> Any:
    """A FLUX.2 [klein]-shaped pipeline: a Qwen3 text encoder, classifier-free guidance with an empty negative
    prompt (none when distilled), FLUX.2's patchified VAE latents."""
    from diffusers import Flux2KleinPipeline
    from transformers import Qwen3ForCausalLM

    torch.manual_seed(seed)
    return evaluating(
        Flux2KleinPipeline(
            scheduler=_flow_scheduler(),
            vae=tiny_flux2_vae(),
            text_encoder=Qwen3ForCausalLM(_qwen3_config(layers=KLEIN_TEXT_LAYERS)),
            tokenizer=tiny_chat_tokenizer(),
            transformer=_flux2_transformer(32, 3 * 16, guidance_embeds=False),
            is_distilled=distilled,
        )
    )


def tiny_z_image_pipeline(seed: int = 0) -> Any:
    """A Z-Image-shaped pipeline: a Qwen3 text encoder's second-to-last hidden states, a single-stream DiT with
    2x2 patches and 3-axis rotary positions, the 16-channel FLUX VAE."""
    from diffusers import ZImagePipeline, ZImageTransformer2DModel
    from transformers import Qwen3Model

    torch.manual_seed(seed)
    transformer = ZImageTransformer2DModel(all_patch_size=(2,), all_f_patch_size=(1,), in_channels=16, dim=32,
                                           n_layers=2, n_refiner_layers=1, n_heads=2, n_kv_heads=2,
                                           cap_feat_dim=16, axes_dims=[4, 6, 6], axes_lens=[512, 64, 64])  # fmt: skip
    return evaluating(
        ZImagePipeline(
            scheduler=_flow_scheduler(dynamic=False, shift=3.0),
            vae=tiny_flux_vae(),
            text_encoder=Qwen3Model(_qwen3_config()),
            tokenizer=tiny_chat_tokenizer(),
            transformer=transformer,
        )
    )


def _clip_with_projection(seed: int) -> Any:
    from transformers import CLIPTextModelWithProjection

    torch.manual_seed(seed)
    return CLIPTextModelWithProjection(_text_config())


def _t5(d_model: int = 32) -> Any:
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(vocab_size=200, d_model=d_model, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
                                   decoder_start_token_id=0, pad_token_id=0, eos_token_id=1))  # fmt: skip


def tiny_sd3_pipeline(seed: int = 0, pos_embed_max_size: int = 48) -> Any:
    """An SD3-shaped pipeline: CLIP-L and CLIP-G (pooled and hidden states) and T5 prompt encoding, an MMDiT with
    2x2 patches and a position table of `pos_embed_max_size` patches (768 px with the 8x VAE), the 16-channel
    VAE, a fixed shift of 3."""
    from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline

    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(sample_size=32, patch_size=2, in_channels=16, out_channels=16, num_layers=2,
                                        attention_head_dim=8, num_attention_heads=4, joint_attention_dim=64,
                                        caption_projection_dim=32, pooled_projection_dim=64,
                                        pos_embed_max_size=pos_embed_max_size)  # fmt: skip
    return evaluating(
        StableDiffusion3Pipeline(
            scheduler=_flow_scheduler(dynamic=False, shift=3.0),
            vae=tiny_flux_vae(),
            text_encoder=_clip_with_projection(seed + 1),
            tokenizer=tiny_tokenizer(),
            text_encoder_2=_clip_with_projection(seed + 2),
            tokenizer_2=tiny_tokenizer(),
            text_encoder_3=_t5(64),
            tokenizer_3=tiny_t5_tokenizer(),
            transformer=transformer,
        )
    )


def tiny_pixart_sigma_pipeline(seed: int = 0) -> Any:
    """A PixArt-Σ-shaped pipeline: T5 prompt encoding, a DiT with 2x2 patches predicting noise and its variance
    (8 output channels), SD's 4-channel VAE, DPM-Solver++."""
    from diffusers import DPMSolverMultistepScheduler, PixArtSigmaPipeline, PixArtTransformer2DModel

    torch.manual_seed(seed)
    transformer = PixArtTransformer2DModel(sample_size=32, num_layers=2, patch_size=2, attention_head_dim=8,
                                           num_attention_heads=3, caption_channels=32, in_channels=4,
                                           cross_attention_dim=24, out_channels=8, attention_bias=True,
                                           activation_fn="gelu-approximate", num_embeds_ada_norm=1000,
                                           norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6,
                                           interpolation_scale=None)  # fmt: skip
    scheduler = DPMSolverMultistepScheduler(beta_start=0.0001, beta_end=0.02, beta_schedule="linear",
                                            prediction_type="epsilon", algorithm_type="dpmsolver++")  # fmt: skip
    pipe = PixArtSigmaPipeline(tokenizer=tiny_t5_tokenizer(), text_encoder=_t5(32), vae=tiny_vae(),
                               transformer=transformer, scheduler=scheduler)  # fmt: skip
    return evaluating(pipe)


def tiny_qwen_image_vae(z_dim: int = 4) -> Any:
    """A Qwen-Image-shaped VAE: causal 3D convolutions, per-pixel RMS norms, a single-head mid-block attention,
    8x spatial compression, per-channel latent mean/std (not 0/1, so the normalisation is exercised)."""
    from diffusers import AutoencoderKLQwenImage

    return AutoencoderKLQwenImage(base_dim=z_dim * 2, z_dim=z_dim, dim_mult=[1, 2, 2, 2], num_res_blocks=1,
                                  temperal_downsample=[False, True, True],
                                  latents_mean=[0.1 * (i - z_dim / 2) for i in range(z_dim)],
                                  latents_std=[1.0 + 0.25 * i for i in range(z_dim)])  # fmt: skip


def tiny_qwen_image_pipeline(seed: int = 0) -> Any:
    """A Qwen-Image-shaped pipeline: a Qwen2.5-VL text encoder's last hidden states (template tokens dropped), an
    MMDiT over 2x2-packed latents with centred rotary positions, the Qwen-Image VAE, dynamic shift."""
    from diffusers import FlowMatchEulerDiscreteScheduler, QwenImagePipeline, QwenImageTransformer2DModel
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(seed)
    transformer = QwenImageTransformer2DModel(patch_size=2, in_channels=16, out_channels=4, num_layers=2,
                                              attention_head_dim=16, num_attention_heads=2, joint_attention_dim=16,
                                              guidance_embeds=False, axes_dims_rope=(8, 4, 4))  # fmt: skip
    tokenizer = tiny_chat_tokenizer()
    config = Qwen2_5_VLConfig(
        text_config={"hidden_size": 16, "intermediate_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2,
                     "num_key_value_heads": 2, "rope_theta": 1000000.0, "vocab_size": len(tokenizer),
                     "rope_scaling": {"mrope_section": [1, 1, 2], "rope_type": "default", "type": "default"}},
        vision_config={"depth": 1, "hidden_size": 16, "intermediate_size": 16, "num_heads": 2, "out_hidden_size": 16},
        hidden_size=16, vocab_size=len(tokenizer), vision_start_token_id=len(tokenizer) - 3,
        vision_end_token_id=len(tokenizer) - 2, vision_token_id=len(tokenizer) - 1,
    )  # fmt: skip
    scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=0.9,
                                                base_image_seq_len=256, max_image_seq_len=8192, shift_terminal=0.02,
                                                time_shift_type="exponential")  # fmt: skip
    pipe = QwenImagePipeline(
        scheduler=scheduler,
        vae=tiny_qwen_image_vae(),
        tokenizer=tokenizer,
        text_encoder=Qwen2_5_VLForConditionalGeneration(config),
        transformer=transformer,
    )
    return evaluating(pipe)


def tiny_dc_ae() -> Any:
    """A DC-AE-shaped autoencoder: 8x compression in 4 stages (pixel-unshuffle down, pixel-shuffle up, as the
    released ones), ReLU linear attention in the two deepest stages of each direction, RMS norms."""
    from diffusers import AutoencoderDC

    return AutoencoderDC(in_channels=3, latent_channels=4, attention_head_dim=4,
                         encoder_block_types=("ResBlock", "ResBlock", "EfficientViTBlock", "EfficientViTBlock"),
                         decoder_block_types=("ResBlock", "ResBlock", "EfficientViTBlock", "EfficientViTBlock"),
                         encoder_block_out_channels=(8, 8, 16, 16), decoder_block_out_channels=(8, 8, 16, 16),
                         encoder_qkv_multiscales=((), (), (5,), (5,)), decoder_qkv_multiscales=((), (), (5,), (5,)),
                         encoder_layers_per_block=(1, 1, 1, 1), decoder_layers_per_block=(1, 1, 1, 1),
                         downsample_block_type="pixel_unshuffle", upsample_block_type="pixel_shuffle",
                         decoder_norm_types="rms_norm", decoder_act_fns="silu", scaling_factor=0.41407)  # fmt: skip


def tiny_sana_pipeline(seed: int = 0) -> Any:
    """A SANA-shaped pipeline: Gemma-2 prompts (with the pipeline's instruction prefix), a linear-attention DiT
    over 1x1 patches, the DC-AE, DPM-Solver with flow sigmas and a fixed shift of 3."""
    from diffusers import DPMSolverMultistepScheduler, SanaPipeline, SanaTransformer2DModel
    from transformers import Gemma2Config, Gemma2Model

    torch.manual_seed(seed)
    transformer = SanaTransformer2DModel(patch_size=1, in_channels=4, out_channels=4, num_layers=2,
                                         num_attention_heads=2, attention_head_dim=8, num_cross_attention_heads=2,
                                         cross_attention_head_dim=8, cross_attention_dim=16, caption_channels=16,
                                         sample_size=32)  # fmt: skip
    tokenizer = tiny_chat_tokenizer()
    gemma = Gemma2Model(Gemma2Config(head_dim=8, hidden_size=16, intermediate_size=32, num_attention_heads=2,
                                     num_hidden_layers=1, num_key_value_heads=2, vocab_size=len(tokenizer),
                                     max_position_embeddings=4096, attn_implementation="eager"))  # fmt: skip
    scheduler = DPMSolverMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)
    pipe = SanaPipeline(tokenizer=tokenizer, text_encoder=gemma, vae=tiny_dc_ae(), transformer=transformer,
                        scheduler=scheduler)  # fmt: skip
    return evaluating(pipe)


def load_saved(folder: str | Path) -> Any:
    """A pipeline saved by `save_tiny`, loaded back as a hub model loads (local files only, quiet)."""
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(folder, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe
