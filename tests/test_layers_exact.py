"""The exact layers of the published-weights grid (layers.FINE): OSDiff's entropy-parameter path."""

import pytest
import torch
import torch.nn.functional as F

from diffo.layers import (COARSE, FINE, ExactConv2d, ExactGELU, FineExactConv2d, FineExactConvTranspose2d,
                          exact_conv2d, set_exact, to_grid)


def test_gelu_of_every_grid_value_is_far_from_a_rounding_boundary():
    """exact_gelu rounds float64 GELU of grid values back onto the grid: the result is machine-independent as long
    as no value lies within the float64 error of erf from a rounding boundary. All 2^21 + 1 grid values checked."""
    x = torch.arange(-(2 ** 20), 2 ** 20 + 1, dtype=torch.float64) / 2.0 ** FINE.act_bits
    y = F.gelu(x) * 2.0 ** FINE.act_bits
    distance = (y - y.floor() - 0.5).abs()  # in grid steps, to the nearest k + 1/2
    assert distance.min() > 1e-6  # measured 7.3e-5; float64 erf errors are ~1e-16 relative


@pytest.mark.parametrize("stride,kernel,padding,output_padding", [(2, 5, 2, 1), (1, 3, 1, 0), (2, 3, 1, 1)])
def test_exact_transposed_conv_equals_float64_reference(stride, kernel, padding, output_padding):
    torch.manual_seed(0)
    conv = FineExactConvTranspose2d(6, 5, kernel, stride=stride, padding=padding, output_padding=output_padding).eval()
    x = to_grid(torch.randn(2, 6, 7, 9) * 3, FINE.act_bits)
    w = to_grid(conv.weight, FINE.weight_bits, FINE.weight_limit).double()
    b = to_grid(conv.bias, FINE.act_bits).double()
    ref = F.conv_transpose2d(x.double(), w, b, stride, padding, output_padding)
    assert torch.equal(conv(x), to_grid(ref, FINE.act_bits))


def test_exact_conv_in_row_blocks_equals_one_block(monkeypatch):
    import diffo.layers as layers

    torch.manual_seed(1)
    x = to_grid(torch.randn(1, 7, 23, 17), FINE.act_bits).double()
    w = to_grid(torch.randn(4, 7, 5, 5) * 0.1, FINE.weight_bits)
    whole = exact_conv2d(x, w, None, (2, 2), (2, 2))
    monkeypatch.setattr(layers, "_CHUNK_ELEMENTS", 1)  # one output row per block
    assert torch.equal(exact_conv2d(x, w, None, (2, 2), (2, 2)), whole)


def test_results_do_not_depend_on_batch_or_thread_count():
    torch.manual_seed(2)
    conv = FineExactConv2d(32, 48, 5, padding=2).eval()
    x = to_grid(torch.randn(3, 32, 12, 12), FINE.act_bits)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = conv(x)
        torch.set_num_threads(max(2, threads))
        many = conv(x)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, many) and torch.equal(conv(x[1:2]), one[1:2])


def test_grids_bound_the_fan_in_that_stays_exact():
    assert FINE.max_fan_in() >= 320 * 25  # a 5x5 transposed convolution over OSDiff's M = 320 channels
    assert COARSE.max_fan_in() >= 2 ** 20 and ExactConv2d.grid is COARSE  # DiffO's grid is unchanged


def test_set_exact_switches_to_the_plain_float_arithmetic():
    torch.manual_seed(3)
    net = torch.nn.Sequential(FineExactConv2d(4, 4, 1), ExactGELU()).eval()
    x = to_grid(torch.randn(1, 4, 3, 3), FINE.act_bits)
    plain = F.gelu(F.conv2d(x, net[0].weight, net[0].bias))
    set_exact(net, False)
    assert torch.allclose(net(x), plain, atol=1e-6) and net(x).dtype == torch.float32
    set_exact(net, True)
    assert net(x).dtype == torch.float64 and torch.allclose(net(x).float(), plain, atol=2e-3)
