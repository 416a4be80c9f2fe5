import pytest
import torch

from pyroflows.nn_image import ConvResNet


@pytest.mark.parametrize("blocks", [0, 2])
@pytest.mark.parametrize("batch_shape", [(), (7,), (3, 5)], ids=str)
def test_shapes_and_zero_output_at_initialisation(blocks, batch_shape):
    net = ConvResNet(3, 4, channels=8, blocks=blocks)
    out = net(torch.randn(*batch_shape, 3, 5, 6))
    assert out.shape == (*batch_shape, 4, 5, 6)
    assert (out == 0).all()
    assert len(net.blocks) == blocks


def test_the_context_is_broadcast_as_constant_channels():
    torch.manual_seed(0)
    net = ConvResNet(2, 3, channels=8, blocks=1, context_dim=4)
    torch.nn.init.normal_(net.head.weight)
    x = torch.randn(3, 1, 2, 4, 4)
    context = torch.randn(5, 4)
    out = net(x, context)
    assert out.shape == (3, 5, 3, 4, 4)
    # the same as passing the constant planes by hand through an unconditional copy
    planes = context[:, :, None, None].expand(5, 4, 4, 4)
    by_hand = torch.cat([x.expand(3, 5, 2, 4, 4), planes.expand(3, 5, 4, 4, 4)], dim=-3)
    plain = ConvResNet(6, 3, channels=8, blocks=1)
    plain.load_state_dict(net.state_dict())
    torch.testing.assert_close(plain(by_hand), out)
    assert not torch.allclose(out[:, 0], out[:, 1])


def test_bad_inputs_and_arguments_are_value_errors():
    net = ConvResNet(2, 3, channels=4, context_dim=2)
    with pytest.raises(ValueError, match=r"expected an input of shape \(\*batch, 2, H, W\)"):
        net(torch.randn(5, 3, 4, 4), torch.randn(5, 2))
    with pytest.raises(ValueError, match=r"expected a context of shape \(\*batch, 2\); got None"):
        net(torch.randn(5, 2, 4, 4))
    with pytest.raises(ValueError, match="batch shape broadcasts"):
        net(torch.randn(5, 2, 4, 4), torch.randn(4, 2))
    with pytest.raises(ValueError, match="blocks: expected a non-negative integer"):
        ConvResNet(2, 3, blocks=True)
    with pytest.raises(ValueError, match="channels: expected a positive integer"):
        ConvResNet(2, 3, channels=0)
