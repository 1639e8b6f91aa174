import pytest
import torch

from qlight import QlightError
from qlight.models import build_backbone, vgg11_bn


def test_vgg11_bn_matches_published_size_and_shape():
    model = vgg11_bn(num_classes=100)
    assert sum(p.numel() for p in model.parameters()) == 9_802_596
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [c.out_channels for c in convs] == [64, 128, 256, 256, 512, 512, 512, 512]
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 100)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_vgg11_bn_forward_in_half_precisions(dtype):
    model = vgg11_bn(num_classes=10).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = model(x)
        out = model.to(dtype)(x.to(dtype))
    assert out.dtype == dtype
    assert torch.isfinite(out).all()
    assert torch.allclose(out.float(), ref, atol=0.1 * ref.abs().max().item())


def test_unknown_backbone_names_choices():
    with pytest.raises(QlightError, match="vgg11_bn"):
        build_backbone("resnet", 10)
