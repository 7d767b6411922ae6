import pytest
import torch

from trainer.models.encoders import ENCODERS, build_encoder, load_pretrained
from trainer.models.heads import ContrastiveModel, ProjectionHead


def _z(out: torch.Tensor | dict[str, torch.Tensor]) -> torch.Tensor:
    """Head outputs ``[B, V, D]`` from ContrastiveModel (a tensor, or ``{"h", "z"}`` since heads.py returns both)."""
    return out["z"] if isinstance(out, dict) else out


def test_resnet18_forward_backward_on_log_mel():
    enc = build_encoder("resnet18", in_channels=1, width=8)
    x = torch.randn(3, 1, 64, 101, requires_grad=True)
    out = enc(x)
    assert out.shape == (3, enc.embedding_dim) == (3, 64)
    out.sum().backward()
    assert x.grad is not None


def test_parameter_names_follow_torchvision():
    names = set(build_encoder("resnet18", in_channels=3).state_dict())
    for key in ("conv1.weight", "bn1.running_mean", "layer1.0.conv1.weight", "layer2.0.downsample.0.weight",
                "layer2.0.downsample.1.weight", "layer4.1.bn2.bias"):
        assert key in names
    assert build_encoder("resnet18").embedding_dim == 512


def test_projection_head_outputs_unit_vectors_per_view():
    enc = build_encoder("resnet18", width=4)
    model = ContrastiveModel(enc, ProjectionHead(enc.embedding_dim, 16, 8))
    z = _z(model(torch.randn(5, 2, 1, 32, 40)))
    assert z.shape == (5, 2, 8)
    assert torch.allclose(z.norm(dim=-1), torch.ones(5, 2), atol=1e-5)


def test_unknown_encoder_lists_the_choices():
    with pytest.raises(ValueError, match="resnet18"):
        build_encoder("resnet1000")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_bf16_autocast_step_on_gpu():
    from trainer.objectives.ntxent import nt_xent
    enc = build_encoder("resnet18", width=16).cuda()
    model = ContrastiveModel(enc, ProjectionHead(enc.embedding_dim, 64, 32).cuda())
    with torch.autocast("cuda", dtype=torch.bfloat16):
        z = _z(model(torch.randn(8, 2, 1, 64, 101, device="cuda")))
        loss = nt_xent(z, z, 0, temperature=0.2)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()


# ---- every registered encoder ------------------------------------------------------------------

SMALL_WIDTH = {"resnet18": 8, "resnet50": 8, "efficientnet_b0": 16, "vgglike": 8, "crnn": 8}
EMBEDDING_AT_64 = {"resnet18": 512, "resnet50": 2048, "efficientnet_b0": 1280, "vgglike": 512, "crnn": 128}


def _first_conv(model: torch.nn.Module) -> torch.nn.Conv2d:
    return next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))


def test_registry_lists_every_encoder():
    assert set(ENCODERS) == set(SMALL_WIDTH)


@pytest.mark.parametrize("in_channels", [1, 3])
@pytest.mark.parametrize("name", sorted(SMALL_WIDTH))
def test_every_encoder_forward_backward_on_log_mel(name, in_channels):
    torch.manual_seed(0)
    enc = build_encoder(name, in_channels=in_channels, width=SMALL_WIDTH[name])
    x = torch.randn(2, in_channels, 64, 96)
    out = enc(x)
    assert out.shape == (2, enc.embedding_dim)
    # a random projection, not out.sum(): a sum right after train-mode BN has zero gradient
    (out * torch.randn_like(out)).sum().backward()
    grad = _first_conv(enc).weight.grad
    assert grad is not None and grad.abs().sum() > 0
    assert _first_conv(enc).in_channels == in_channels


@pytest.mark.parametrize("name", sorted(EMBEDDING_AT_64))
def test_published_width_embedding_dims(name):
    assert build_encoder(name).embedding_dim == EMBEDDING_AT_64[name]


def test_encoders_accept_short_narrow_inputs():
    for name in ("vgglike", "crnn"):
        enc = build_encoder(name, width=4).eval()
        assert enc(torch.randn(1, 1, 20, 7)).shape == (1, enc.embedding_dim)


# ---- torchvision parameter names ---------------------------------------------------------------

def _bn_keys(prefix: str) -> list[str]:
    return [f"{prefix}.{s}" for s in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")]


def torchvision_resnet50_keys() -> set[str]:
    """torchvision's resnet50 state-dict keys without ``fc.*``, built from its known structure."""
    keys = ["conv1.weight", *_bn_keys("bn1")]
    for layer, blocks in enumerate((3, 4, 6, 3), start=1):
        for b in range(blocks):
            p = f"layer{layer}.{b}"
            for i in (1, 2, 3):
                keys += [f"{p}.conv{i}.weight", *_bn_keys(f"{p}.bn{i}")]
            if b == 0:  # every first block changes channels (and stride from layer2 on)
                keys += [f"{p}.downsample.0.weight", *_bn_keys(f"{p}.downsample.1")]
    return set(keys)


def test_resnet50_keys_match_torchvision():
    enc = build_encoder("resnet50", in_channels=3)
    assert set(enc.state_dict()) == torchvision_resnet50_keys()
    assert enc.embedding_dim == 2048
    # torchvision's resnet50: 25,557,032 parameters, of which fc holds 2048 * 1000 + 1000
    assert sum(p.numel() for p in enc.parameters()) == 25_557_032 - 2_049_000
    assert enc.layer2[0].conv2.stride == (2, 2) and enc.layer2[0].conv1.stride == (1, 1)  # v1.5


def test_efficientnet_b0_keys_and_size_match_torchvision():
    enc = build_encoder("efficientnet_b0", in_channels=3)
    keys = set(enc.state_dict())
    for key in ("features.0.0.weight", "features.0.1.running_var",
                "features.1.0.block.0.0.weight", "features.1.0.block.1.fc1.weight", "features.1.0.block.1.fc2.bias",
                "features.1.0.block.2.0.weight", "features.1.0.block.2.1.weight",
                "features.2.0.block.0.0.weight", "features.2.0.block.1.0.weight", "features.2.0.block.2.fc1.weight",
                "features.2.0.block.3.1.running_mean", "features.6.3.block.3.0.weight",
                "features.7.0.block.3.0.weight", "features.8.0.weight", "features.8.1.num_batches_tracked"):
        assert key in keys, key
    assert "features.1.0.block.3.0.weight" not in keys and "features.6.4.block.0.0.weight" not in keys
    assert tuple(enc.state_dict()["features.1.0.block.0.0.weight"].shape) == (32, 1, 3, 3)  # depthwise
    assert tuple(enc.state_dict()["features.8.0.weight"].shape) == (1280, 320, 1, 1)
    n_params = sum(p.numel() for p in enc.parameters())
    assert abs(n_params - 4_007_548) <= 0.01 * 4_007_548  # torchvision's B0 minus its classifier


# ---- load_pretrained ---------------------------------------------------------------------------

def _torchvision_style_state(name: str, width: int, in_channels: int = 3) -> dict[str, torch.Tensor]:
    """A state dict named like torchvision's model of ``name``, classifier included."""
    torch.manual_seed(1)
    enc = build_encoder(name, in_channels=in_channels, width=width)
    state = {k: torch.randn_like(v) if v.is_floating_point() else v for k, v in enc.state_dict().items()}
    if name.startswith("resnet"):
        state.update({"fc.weight": torch.randn(10, enc.embedding_dim), "fc.bias": torch.randn(10)})
    else:
        state.update({"classifier.1.weight": torch.randn(10, enc.embedding_dim), "classifier.1.bias": torch.randn(10)})
    return state


@pytest.mark.parametrize("name,width", [("resnet18", 64), ("resnet50", 16)])
def test_load_pretrained_rgb_pth_into_one_channel(tmp_path, name, width):
    state = _torchvision_style_state(name, width)
    path = tmp_path / "weights.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}, "epoch": 90}, path)
    enc = build_encoder(name, in_channels=1, width=width)
    report = load_pretrained(enc, path)
    loaded = enc.state_dict()
    assert torch.allclose(loaded["conv1.weight"], state["conv1.weight"].sum(dim=1, keepdim=True))
    for key, value in loaded.items():
        if key != "conv1.weight":
            assert torch.equal(value, state[key]), key
    assert sorted(report.dropped) == ["fc.bias", "fc.weight"]
    assert set(report.adapted) == {"conv1.weight"}
    assert len(report.loaded) == len(loaded) - 1


def test_load_pretrained_one_channel_into_three_repeats_and_divides():
    state = _torchvision_style_state("efficientnet_b0", 16, in_channels=1)
    enc = build_encoder("efficientnet_b0", in_channels=3, width=16)
    report = load_pretrained(enc, {"model": state})
    first = enc.state_dict()["features.0.0.weight"]
    assert torch.allclose(first, state["features.0.0.weight"].repeat(1, 3, 1, 1) / 3)
    assert torch.equal(enc.state_dict()["features.8.0.weight"], state["features.8.0.weight"])
    assert report.dropped == ["classifier.1.weight", "classifier.1.bias"]


def test_load_pretrained_safetensors(tmp_path):
    from safetensors.torch import save_file
    state = _torchvision_style_state("resnet18", 8)
    path = tmp_path / "weights.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    enc = build_encoder("resnet18", in_channels=3, width=8)
    report = load_pretrained(enc, path)
    assert all(torch.equal(v, state[k]) for k, v in enc.state_dict().items())
    assert not report.adapted and len(report.dropped) == 2


def test_load_pretrained_tolerates_missing_num_batches_tracked():
    state = {k: v for k, v in _torchvision_style_state("resnet18", 8).items() if "num_batches_tracked" not in k}
    enc = build_encoder("resnet18", in_channels=3, width=8)
    report = load_pretrained(enc, state)
    assert report.kept and all(k.endswith("num_batches_tracked") for k in report.kept)


def test_load_pretrained_shape_mismatch_names_key_and_file(tmp_path):
    path = tmp_path / "narrow.pth"
    torch.save(_torchvision_style_state("resnet18", 8), path)
    enc = build_encoder("resnet18", in_channels=3, width=16)
    before = {k: v.clone() for k, v in enc.state_dict().items()}
    expected = r"narrow\.pth.*shape mismatch: conv1\.weight \(file \(8, 3, 7, 7\) vs encoder \(16, 3, 7, 7\)\)"
    with pytest.raises(ValueError, match=expected):
        load_pretrained(enc, path)
    assert all(torch.equal(v, before[k]) for k, v in enc.state_dict().items())  # nothing half-loaded


def test_load_pretrained_unknown_and_missing_keys_are_named():
    state = _torchvision_style_state("resnet18", 8)
    state["layer5.0.conv1.weight"] = torch.zeros(1)
    enc = build_encoder("resnet18", in_channels=3, width=8)
    with pytest.raises(ValueError, match=r"unexpected keys: layer5\.0\.conv1\.weight"):
        load_pretrained(enc, state)
    del state["layer5.0.conv1.weight"], state["bn1.weight"]
    with pytest.raises(ValueError, match=r"missing keys: bn1\.weight"):
        load_pretrained(enc, state)


def test_load_pretrained_lenient_shapes_skips_and_reports():
    state = _torchvision_style_state("resnet18", 8)
    state["layer4.1.bn2.bias"] = torch.zeros(3)
    enc = build_encoder("resnet18", in_channels=3, width=8)
    report = load_pretrained(enc, state, strict_shapes=False)
    assert report.skipped == ["layer4.1.bn2.bias"]
    assert torch.equal(enc.state_dict()["layer4.0.conv1.weight"], state["layer4.0.conv1.weight"])


@pytest.mark.e2e
def test_narrow_resnets_train_channels_last_on_the_cpu():
    """oneDNN's strided 1x1 backward corrupted the heap for fewer than 8 input channels (a
    width-4 ResNet-18, channels-last, one thread: "double free or corruption" on an AVX2
    CPU); the shortcut's projection avoids it and still computes the strided conv."""
    import subprocess
    import sys

    from tests.conftest import cli_env

    script = """
import torch
from trainer.models.encoders import build_encoder
torch.set_num_threads(1)
torch.manual_seed(0)
for width in (2, 4, 6):
    enc = build_encoder("resnet18", in_channels=1, width=width)
    ref = build_encoder("resnet18", in_channels=1, width=width)
    ref.load_state_dict(enc.state_dict())
    enc = enc.to(memory_format=torch.channels_last)
    x = torch.randn(16, 1, 64, 101)
    for _ in range(4):  # the fault showed within a few steps
        enc(x.to(memory_format=torch.channels_last)).sum().backward()
    enc.zero_grad()
    a = enc(x.to(memory_format=torch.channels_last))
    a.sum().backward()
    b = ref(x)
    b.sum().backward()
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    for (name, p), q in zip(enc.named_parameters(), ref.parameters()):
        scale = float(q.grad.abs().max())
        torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=1e-3 * scale, msg=name)
print("fine")
"""
    out = subprocess.run([sys.executable, "-c", script], env=cli_env(), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "fine" in out.stdout, out.stderr[-2000:]
