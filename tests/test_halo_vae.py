"""Tiled passes through VAEs without image-wide statistics (gigadiff.vae.passes, gigadiff.vae.halo): the reach
measured on the network, attention summaries gathered tile by tile, and Qwen-Image's VAE and SANA's DC-AE tiled
against their whole decode and encode on a real photo."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from gigadiff.vae.halo import HaloTiledVAE, whole_decode
from gigadiff.vae.latents import scale_latents
from gigadiff.vae.passes import LinearAttention, SoftmaxAttention, Stage, TiledPass, execution_order, reach, stage_reach
from gigadiff.vae.tiles import Collector
from gigadiff.vae.tiling import VaeTiling


class ToyLinear(LinearAttention):
    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.weight = weight  # [3 * 4, C]: q, k, v of one head of 4 channels

    def qkv(self, x):
        b, _, h, w = x.shape
        q, k, v = torch.einsum("oc,bchw->bohw", self.weight, x).reshape(b, 3, 1, 4, h * w).unbind(1)
        return F.relu(q), F.relu(k), v

    def finish(self, x, attended):
        return x + attended.reshape(x.shape[0], 4, *x.shape[-2:]).sum(1, keepdim=True)


class ToySoftmax(SoftmaxAttention):
    def __init__(self, weight: torch.Tensor, max_keys: int | None):
        super().__init__(1.0, max_keys)
        self.weight = weight

    def qkv(self, x):
        b, _, h, w = x.shape
        q, k, v = torch.einsum("oc,bchw->bohw", self.weight, x).reshape(b, 3, 4, h * w).transpose(2, 3).unbind(1)
        return q[:, None], k[:, None], v[:, None]

    def finish(self, x, attended):
        return x + attended[:, 0].transpose(1, 2).reshape(x.shape[0], 4, *x.shape[-2:]).sum(1, keepdim=True)


def toy_network(op, convs=None):
    """conv 3x3 -> attention op -> conv 3x3 -> 2x nearest upsample -> conv 3x3: reach 3 input px."""
    torch.manual_seed(0)
    convs = convs if convs is not None else [torch.nn.Conv2d(2, 2, 3, padding=1) for _ in range(3)]

    def run(x):
        y = convs[1](op(convs[0](x), lambda t: t))
        return convs[2](F.interpolate(y, scale_factor=2, mode="nearest"))

    return run


@pytest.mark.parametrize("kind", ["linear", "softmax"])
def test_tiles_with_the_measured_reach_equal_the_whole_pass(kind):
    torch.manual_seed(1)
    op = ToyLinear(torch.randn(12, 2)) if kind == "linear" else ToySoftmax(torch.randn(12, 2), max_keys=None)
    run = toy_network(op)
    assert reach(run, [op], 2, 2.0, 1, start=8) == 3
    x = torch.randn(1, 2, 37, 29)
    op.mode = "probe"  # the whole pass: the summary of the whole input
    whole = run(x).detach()
    op.mode = "plain"
    out = Collector()
    TiledPass(run, [op], tile=8, halo=3, align=1, scale=2.0).run(x, out, "cpu", torch.float32)
    assert out.image.shape == whole.shape
    assert (out.image - whole).abs().max() <= 1e-5 * whole.abs().max()
    short = Collector()  # one pixel of halo too few: the cuts show
    TiledPass(run, [op], tile=8, halo=2, align=1, scale=2.0).run(x, short, "cpu", torch.float32)
    assert (short.image - whole).abs().max() > 1e-3


def test_stages_are_cut_to_what_the_rest_of_the_network_needs():
    """After the second conv only the last one (at twice the resolution) still reads around the core: 1 input px.
    Cutting there keeps the result and runs the fine stage on the core plus that px."""
    torch.manual_seed(1)
    op = ToyLinear(torch.randn(12, 2))
    torch.manual_seed(0)
    convs = [torch.nn.Conv2d(2, 2, 3, padding=1) for _ in range(3)]
    run = toy_network(op, convs)
    assert stage_reach(run, [op], 2, 2.0, 1, convs[1], size=8) == 1
    x = torch.randn(1, 2, 37, 29)
    op.mode = "probe"
    whole = run(x).detach()
    op.mode = "plain"
    widths = []
    hook = convs[2].register_forward_pre_hook(lambda module, args: widths.append(args[0].shape[-1]))
    out = Collector()
    try:
        TiledPass(run, [op], tile=8, halo=3, align=1, scale=2.0, stages=[Stage(convs[1], 1)]).run(x, out, "cpu",
                                                                                          torch.float32)  # fmt: skip
    finally:
        hook.remove()
    assert (out.image - whole).abs().max() <= 1e-5 * whole.abs().max()
    assert max(widths) <= 2 * (8 + 2)  # core 8 (or less) + 1 px each side, upsampled: not 8 + 2 * 3


class CountedConv(torch.nn.Conv2d):
    """A 3x3 convolution that counts the times it computes."""

    def __init__(self):
        super().__init__(2, 2, 3, padding=1)
        self.runs = 0

    def forward(self, x):
        self.runs += 1
        return super().forward(x)


class TwoAttentions(torch.nn.Module):
    """conv -> attention A -> conv -> attention B -> conv -> 2x upsample -> conv, each conv a stage."""

    def __init__(self, a, b):
        super().__init__()
        torch.manual_seed(0)
        self.convs = torch.nn.ModuleList(CountedConv() for _ in range(4))
        self.a, self.b = a, b

    def forward(self, x):
        x = self.convs[1](self.a(self.convs[0](x), lambda t: t))
        x = self.convs[2](self.b(x, lambda t: t))
        return self.convs[3](F.interpolate(x, scale_factor=2, mode="nearest"))


@pytest.mark.parametrize("keep", ["everything", "some tiles", "nothing"])
def test_later_passes_resume_from_the_stage_outputs_kept_for_them(keep):
    """Pass 1 (gathering B) resumes after the first conv, the output pass after the second: the early convs run
    once per tile instead of once per pass, as far as the kept bytes allow, and the image is the same."""
    torch.manual_seed(1)
    a, b = ToyLinear(torch.randn(12, 2)), ToyLinear(torch.randn(12, 2))
    net = TwoAttentions(a, b)
    x = torch.randn(1, 2, 37, 29)
    with torch.no_grad():
        for op in (a, b):
            op.mode = "probe"
        whole = net(x)
        for op in (a, b):
            op.mode = "plain"
    order, finished = execution_order(net, [b, a], 2, 1, stages=[net.convs[2], net.convs[0], net.convs[1]])
    assert order == [a, b] and finished == [(1, 0), (2, 1), (0, 2)]  # conv0 before A, conv1 after A, conv2 after B
    stages = [Stage(net.convs[0], 3, 0), Stage(net.convs[1], 2, 1), Stage(net.convs[2], 1, 2)]
    for conv in net.convs:
        conv.runs = 0
    tiled = TiledPass(net, [a, b], tile=8, halo=4, align=1, scale=2.0, stages=stages,
                      keep_bytes={"everything": 1e9, "some tiles": 2000, "nothing": 0}[keep])  # fmt: skip
    out = Collector()
    with torch.no_grad():
        tiled.run(x, out, "cpu", torch.float32)
    tiles, runs = len(tiled.cores(37, 29)), [conv.runs for conv in net.convs[:3]]
    assert (out.image - whole).abs().max() <= 1e-5 * whole.abs().max()
    if keep == "everything":  # conv0 in pass 0 only, conv1 in pass 1 only, conv2 in the output pass
        assert runs == [tiles, tiles, tiles]
    elif keep == "nothing":  # every pass from the input
        assert runs == [3 * tiles, 2 * tiles, tiles]
    else:
        assert tiles < runs[0] < 3 * tiles and tiles < runs[1] < 2 * tiles


def test_pooled_keys_approach_the_exact_attention():
    """Fast mode's keys pooled over cells of the whole image (cells aligned across tiles): the error falls as the
    key budget grows, and with every key it is the exact attention."""
    torch.manual_seed(2)
    weight = torch.randn(12, 2) * 0.5
    x = torch.randn(1, 2, 48, 40)
    exact = ToySoftmax(weight, None)
    run = toy_network(exact)
    exact.mode = "probe"
    whole = run(x).detach()
    errors = []
    for keys in (30, 120, 480, None):
        op = ToySoftmax(weight, keys)
        tiled = TiledPass(toy_network(op), [op], tile=16, halo=3, align=1, scale=2.0)
        out = Collector()
        tiled.run(x, out, "cpu", torch.float32)
        errors.append(float((out.image - whole).abs().max().detach()))
        if keys:
            assert all(c % op.cell == 0 for y0, y1, x0, x1 in tiled.cores(48, 40) for c in (y0, x0))
    assert errors[0] > errors[1] > errors[2] and errors[3] <= 1e-4


@pytest.fixture(scope="module")
def photo():
    from skimage import data

    img = torch.from_numpy(data.astronaut()).permute(2, 0, 1)[None].float() / 127.5 - 1
    return F.interpolate(img, size=(384, 512), mode="bilinear", antialias=True)


@pytest.fixture(scope="module")
def qwen_vae():
    from tests.helpers.tiny import tiny_qwen_image_vae

    torch.manual_seed(0)
    return tiny_qwen_image_vae().eval()


@pytest.fixture(scope="module")
def dc_ae():
    from tests.helpers.tiny import tiny_dc_ae

    torch.manual_seed(0)
    return tiny_dc_ae().eval()


def test_qwen_image_vae_tiled_equals_its_whole_decode_and_encode(qwen_vae, photo):
    """No image-wide statistics: tiles with the measured halo are exact (exact mode: the attention over every
    key). Fast mode pools the attention's keys; its error is stated, here with few keys so that it pools."""
    from gigadiff.backends.codec import VaeCodec
    from gigadiff.backends.qwen_image import qwen_vae_networks

    codec = VaeCodec(qwen_vae, torch.device("cpu"), "halo", qwen_vae_networks(qwen_vae), sample_posterior=False)
    with torch.no_grad():
        moments = qwen_vae.encode(photo[:, :, None]).latent_dist.mode()[:, :, 0]
        whole = qwen_vae.decode(moments[:, :, None]).sample[:, :, 0]
    latents = scale_latents(qwen_vae, moments)
    decoder, encoder = codec.networks
    assert (whole_decode(decoder, qwen_vae, latents) - whole).abs().max() <= 1e-5
    exact = HaloTiledVAE(qwen_vae, decoder, encoder, VaeTiling(mode="exact"), tile_px=128)
    decoded = exact.decode(latents)
    assert decoded.shape == whole.shape and (decoded - whole).abs().max() <= 1e-3
    assert (exact.encode(photo) - latents).abs().max() <= 1e-3
    fast = HaloTiledVAE(qwen_vae, decoder, encoder, VaeTiling(mode="fast"), tile_px=128, max_keys=256)
    error = float((fast.decode(latents) - whole).abs().max())
    assert 0 < error <= 0.05  # measured 0.007 on this photo (48x64 latent, cells of 3x3 keys)
    streamed = Collector()
    codec.stream_decode(latents, streamed, VaeTiling(mode="exact"))
    assert (streamed.image - whole).abs().max() <= 1e-3
    assert codec.preview(latents, 64).shape == (48, 64, 3)


def test_dc_ae_tiled_equals_its_whole_decode_and_encode(dc_ae, photo):
    """Linear attention's whole-image summary (the sum of v kᵀ) is gathered exactly: every mode is exact."""
    from gigadiff.backends.codec import VaeCodec
    from gigadiff.backends.sana import dc_ae_networks

    codec = VaeCodec(dc_ae, torch.device("cpu"), "halo", dc_ae_networks(dc_ae), sample_posterior=False)
    decoder, encoder = codec.networks
    assert len(decoder.ops) == 2 and len(encoder.ops) == 2
    with torch.no_grad():
        raw = dc_ae.encode(photo).latent
        whole = dc_ae.decode(raw).sample.clamp(-1, 1)
    latents = scale_latents(dc_ae, raw)
    for mode in ("fast", "exact"):
        tiled = HaloTiledVAE(dc_ae, decoder, encoder, VaeTiling(mode=mode), tile_px=128)
        assert (tiled.decode(latents) - whole).abs().max() <= 1e-3
        assert (tiled.encode(photo) - latents).abs().max() <= 1e-3
    assert (codec.decode(latents, VaeTiling()) - whole).abs().max() <= 1e-3


def test_the_halo_engine_sizes_its_tiles_from_the_memory_budget(qwen_vae, photo):
    """--vae-memory means what it means for the GroupNorm engine: the device bytes a tile may use. A smaller budget
    gives smaller tiles (more of them) and the same image; a budget with no useful tile is refused when planned."""
    from gigadiff.backends.qwen_image import qwen_vae_networks
    from gigadiff.errors import GigadiffError

    decoder, encoder = qwen_vae_networks(qwen_vae)
    with torch.no_grad():
        latents = scale_latents(qwen_vae, qwen_vae.encode(photo[:, :, None]).latent_dist.mode()[:, :, 0])
    roomy = HaloTiledVAE(qwen_vae, decoder, encoder, VaeTiling(mode="exact", memory_gb=2.0), tile_px=512)
    big = roomy.plan(1, 48, 64)
    tight_gb = 0.45 * big.device_bytes / 2**30  # under half of the roomy tile's memory
    tight = HaloTiledVAE(qwen_vae, decoder, encoder, VaeTiling(mode="exact", memory_gb=tight_gb), tile_px=512)
    small = tight.plan(1, 48, 64)
    assert small.tile < big.tile and small.device_bytes <= small.budget_bytes < big.device_bytes
    assert (tight.decode(latents) - roomy.decode(latents)).abs().max() <= 1e-5  # exact either way
    assert tight.last_plan == small
    starved = HaloTiledVAE(qwen_vae, decoder, encoder, VaeTiling(mode="fast", memory_gb=1e-7), tile_px=512)
    with pytest.raises(GigadiffError, match=r"vae_memory 1e-07 GB is too small for this VAE: a useful tile"):
        starved.plan(1, 48, 64)


def test_halo_models_refuse_an_impossible_budget_and_spill_before_generation(tiny_sana_dir, tmp_path):
    from typer.testing import CliRunner

    from gigadiff.cli import app

    base = ["generate", "x", "--model", str(tiny_sana_dir), "--size", "256x256", "--steps", "1", "-q",
            "-o", str(tmp_path / "o.png")]  # fmt: skip
    result = CliRunner().invoke(app, [*base, "--vae-memory", "0.0000001"])
    assert result.exit_code == 2 and "--vae-memory 1e-07 GB is too small for this VAE" in result.output
    assert not (tmp_path / "o.png").exists()
    result = CliRunner().invoke(app, [*base, "--vae-spill", str(tmp_path)])
    assert (
        result.exit_code == 2
        and "--vae-spill: model" in result.output
        and "keeps no whole-image buffers" in (result.output)
    )
