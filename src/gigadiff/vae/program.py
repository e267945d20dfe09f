"""An AutoencoderKL encoder or decoder, written out as a flat list of steps that can run tile by tile.

Why a program instead of calling the modules: a tiled VAE must treat the two whole-image operations of the
network — GroupNorm statistics and the mid-block self-attention — differently from the local ones (convolutions,
upsampling, activations), and must see exactly where each convolution reads outside its tile. Writing the
network out once as steps, each reading named buffers, lets one engine run it layer by layer over a canvas
(exact mode) or on one tile with frozen statistics (fast mode) with the same code.

Only this module knows diffusers' AutoencoderKL layout (Encoder/Decoder, ResnetBlock2D, Attention, Up/Down
samplers); it refuses variants it would silently get wrong (time-conditioned norms, conv-transpose upsamplers,
spatial norms) with a clear message.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from gigadiff.errors import GigadiffError

SUPPORTED_DIFFUSERS = ">=0.42"
"""The diffusers versions whose VAE layout the tiled VAE is tested with (pyproject.toml pins the same floor)."""


@dataclass(frozen=True)
class ConvStep:
    """dst = (conv(pad(upsample(act(norm(src))))) + shortcut(residual)) / out_scale.

    `pad` is (top, bottom, left, right) — explicit, because the encoder's downsamplers pad asymmetrically.
    The norm (if any) uses the statistics of the whole `src` buffer, never of a tile.
    """

    src: str
    dst: str
    conv: nn.Conv2d
    norm: nn.GroupNorm | None = None
    act: Any = None
    upsample: bool = False
    pad: tuple[int, int, int, int] = (0, 0, 0, 0)
    residual: str | None = None
    shortcut: nn.Conv2d | None = None
    out_scale: float = 1.0

    @property
    def stride(self) -> int:
        return int(self.conv.stride[0])

    @property
    def kernel(self) -> int:
        return int(self.conv.kernel_size[0])

    @property
    def out_channels(self) -> int:
        return int(self.conv.out_channels)


@dataclass(frozen=True)
class AttentionStep:
    """dst = (attention over ALL positions of norm(src)) + src, / rescale — the VAE mid-block's global step."""

    src: str
    dst: str
    attn: Any

    @property
    def out_channels(self) -> int:
        return int(self.attn.to_out[0].out_features)


Step = ConvStep | AttentionStep


@dataclass(frozen=True)
class Program:
    """Steps in execution order; `input` and `output` name the first and last buffers."""

    steps: tuple[Step, ...]
    input: str
    output: str
    scale: int
    """Resolution factor between latent and image (8 for the SD VAEs), in whichever direction the program goes."""
    downsamples: bool = False
    """True for an encoder (image in, latent out), False for a decoder."""

    @property
    def input_unit(self) -> int:
        """Input pixels per latent pixel: the factor for an encoder, 1 for a decoder."""
        return self.scale if self.downsamples else 1

    @property
    def output_per_input(self) -> float:
        """Output pixels per input pixel along one axis."""
        return 1 / self.scale if self.downsamples else float(self.scale)

    def last_use(self) -> dict[str, int]:
        """Index of the last step reading each buffer, so an engine can free buffers as soon as possible."""
        last: dict[str, int] = {}
        for i, step in enumerate(self.steps):
            for name in (step.src, step.residual if isinstance(step, ConvStep) else None):
                if name is not None:
                    last[name] = i
        return last


PLAIN_BLOCKS = ("UpDecoderBlock2D", "DownEncoderBlock2D")
"""The up/down blocks of AutoencoderKL decoders and encoders: resnets and a resampler, no attention."""


def layer(module: Any, name: str) -> Any:
    """`module.name`: an attribute diffusers' class defines in every version gigadiff supports (None where that
    layer is switched off). The tiled VAE reads diffusers' VAE layout layer by layer, so an attribute a newer
    diffusers renamed is a clear error naming the version, never a silent default."""
    try:
        return getattr(module, name)
    except AttributeError:
        import diffusers

        raise GigadiffError(
            f"tiled VAE: {type(module).__name__} of diffusers {diffusers.__version__} has no attribute {name!r}; "
            f"gigadiff's tiled VAE follows diffusers' VAE layout and supports diffusers {SUPPORTED_DIFFUSERS}"
        ) from None


class _Builder:
    def __init__(self, first: str = "x0") -> None:
        self.steps: list[Step] = []
        self.current = first
        self.count = 0

    def fresh(self) -> str:
        self.count += 1
        return f"b{self.count}"

    def conv(self, conv: nn.Conv2d, **kw: Any) -> None:
        dst = self.fresh()
        if "pad" not in kw:
            p = _same_padding(conv)
            kw["pad"] = (p, p, p, p)
        self.steps.append(ConvStep(src=self.current, dst=dst, conv=conv, **kw))
        self.current = dst

    def resnet(self, block: Any) -> None:
        _check_resnet(block)
        x = self.current
        self.conv(block.conv1, norm=block.norm1, act=block.nonlinearity)
        self.conv(block.conv2, norm=block.norm2, act=block.nonlinearity, residual=x, shortcut=block.conv_shortcut,
                  out_scale=float(block.output_scale_factor))  # fmt: skip

    def attention(self, attn: Any) -> None:
        _check_attention(attn)
        dst = self.fresh()
        self.steps.append(AttentionStep(src=self.current, dst=dst, attn=attn))
        self.current = dst

    def resnets_of(self, block: Any) -> None:
        """The resnets of an up/down block (attention inside those blocks is not an AutoencoderKL feature)."""
        if type(block).__name__ not in PLAIN_BLOCKS:
            raise GigadiffError(f"tiled VAE: blocks of type {type(block).__name__} are not supported (it runs "
                                f"{', '.join(PLAIN_BLOCKS)})")  # fmt: skip
        for resnet in block.resnets:
            self.resnet(resnet)

    def mid(self, mid: Any) -> None:
        self.resnet(mid.resnets[0])
        for attn, resnet in zip(mid.attentions, mid.resnets[1:], strict=True):
            if attn is not None:
                self.attention(attn)
            self.resnet(resnet)


def decoder_program(vae: Any) -> Program:
    """post_quant_conv -> conv_in -> mid (resnet, attention, resnet) -> up blocks -> norm, act, conv_out."""
    dec = _decoder_of(vae)
    b = _Builder()
    if layer(vae, "post_quant_conv") is not None:
        b.conv(vae.post_quant_conv)
    b.conv(dec.conv_in)
    b.mid(dec.mid_block)
    scale = 1
    for up in dec.up_blocks:
        b.resnets_of(up)
        for sampler in up.upsamplers or ():
            _check_upsampler(sampler)
            b.conv(sampler.conv, upsample=True)
            scale *= 2
    b.conv(dec.conv_out, norm=dec.conv_norm_out, act=dec.conv_act)
    return Program(tuple(b.steps), "x0", b.current, scale)


def encoder_program(vae: Any) -> Program:
    """conv_in -> down blocks -> mid -> norm, act, conv_out -> quant_conv; the output holds mean and logvar."""
    enc = layer(vae, "encoder")
    if type(enc).__name__ != "Encoder":
        raise GigadiffError(f"tiled VAE: {type(vae).__name__} has no AutoencoderKL-style encoder")
    b = _Builder()
    b.conv(enc.conv_in)
    scale = 1
    for down in enc.down_blocks:
        b.resnets_of(down)
        for sampler in down.downsamplers or ():
            b.conv(sampler.conv, pad=_downsampler_pad(sampler))
            scale *= 2
    b.mid(enc.mid_block)
    b.conv(enc.conv_out, norm=enc.conv_norm_out, act=enc.conv_act)
    if layer(vae, "quant_conv") is not None:
        b.conv(vae.quant_conv)
    return Program(tuple(b.steps), "x0", b.current, scale, downsamples=True)


def _decoder_of(vae: Any) -> Any:
    dec = layer(vae, "decoder")
    if type(dec).__name__ != "Decoder":
        raise GigadiffError(
            f"tiled VAE: {type(vae).__name__} is not an AutoencoderKL-family VAE (needs decoder.mid_block/up_blocks)"
        )
    if not isinstance(dec.conv_norm_out, nn.GroupNorm):
        raise GigadiffError("tiled VAE: decoders with spatially conditioned norms (MoVQ-style) are not supported")
    return dec


def _same_padding(conv: nn.Conv2d) -> int:
    if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
        raise GigadiffError(f"tiled VAE: unsupported convolution padding {conv.padding!r}/{conv.padding_mode}")
    if conv.kernel_size[0] != conv.kernel_size[1] or conv.stride[0] != conv.stride[1] or conv.dilation != (1, 1):
        raise GigadiffError("tiled VAE: only square, undilated convolutions are supported")
    return int(conv.padding[0])


def _downsampler_pad(sampler: Any) -> tuple[int, int, int, int]:
    p = _same_padding(sampler.conv)
    if layer(sampler, "padding") == 0 and layer(sampler, "use_conv"):
        return (0, 1, 0, 1)  # diffusers pads right/bottom by one before a stride-2, padding-0 convolution
    return (p, p, p, p)


def _check_resnet(block: Any) -> None:
    if layer(block, "up") or layer(block, "down"):
        raise GigadiffError("tiled VAE: resampling resnet blocks are not supported")
    if layer(block, "time_emb_proj") is not None:
        raise GigadiffError("tiled VAE: time-conditioned resnet blocks are not supported")
    if not isinstance(block.norm1, nn.GroupNorm) or not isinstance(block.norm2, nn.GroupNorm):
        raise GigadiffError(f"tiled VAE: resnet norms must be GroupNorm, got {type(block.norm1).__name__}")


def _check_attention(attn: Any) -> None:
    if layer(attn, "spatial_norm") is not None or layer(attn, "norm_q") is not None:
        raise GigadiffError("tiled VAE: attention with spatial or q/k norms is not supported")
    if not isinstance(layer(attn, "group_norm"), nn.GroupNorm):
        raise GigadiffError("tiled VAE: VAE attention is expected to start with a GroupNorm")


def _check_upsampler(sampler: Any) -> None:
    if layer(sampler, "use_conv_transpose") or layer(sampler, "norm") is not None:
        raise GigadiffError("tiled VAE: only nearest-neighbour x2 upsamplers followed by a convolution are supported")
    if not layer(sampler, "interpolate") or not layer(sampler, "use_conv"):
        raise GigadiffError("tiled VAE: upsamplers without interpolation or convolution are not supported")
