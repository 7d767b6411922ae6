import pytest
import torch

from trainer.encoders import build_encoder
from trainer.heads import ContrastiveModel, ProjectionHead


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
    z = model(torch.randn(5, 2, 1, 32, 40))
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
        z = model(torch.randn(8, 2, 1, 64, 101, device="cuda"))
        loss = nt_xent(z, z, 0, temperature=0.2)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
