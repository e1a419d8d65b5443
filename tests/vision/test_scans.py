"""Scans: exact inverses for any shape, and the routes equal to the published orders written out here."""

import itertools

import pytest
import torch

from medstate.errors import MedstateError
from medstate.vision.scans import SCAN_KINDS, RouteMerge, Scan, feature_map_of, route_orders, tokens_of

SHAPES = [(1,), (6,), (1, 1), (3, 5), (7, 1), (2, 3, 4), (31, 61, 57)]


@pytest.mark.parametrize("kind", SCAN_KINDS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_inverse_is_exact(kind, shape):
    n = 1
    for s in shape:
        n *= s
    tokens = torch.randn(2, n, 3)
    scan = Scan(kind, stride=3)
    sequences = scan.to_sequences(tokens, shape)
    routes = route_orders(kind, shape, 3).shape[0]
    assert sequences.shape == (2 * routes, n, 3)
    back = scan.from_sequences(sequences, shape)
    assert back.shape == (2, routes, n, 3)
    for r in range(routes):
        assert torch.equal(back[:, r], tokens)  # bitwise
    # every route is a permutation of all positions
    for order in route_orders(kind, shape, 3):
        assert torch.equal(order.sort().values, torch.arange(n))


def test_feature_map_round_trip():
    x = torch.randn(2, 4, 3, 5, 7)
    assert torch.equal(feature_map_of(tokens_of(x), (3, 5, 7)), x)


def test_cross_scan_is_vmamba_four_routes():
    # VMamba's SS2D cross-scan of a [B, C, H, W] map: rows, columns (the transposed map), and both reversed
    x = torch.randn(2, 3, 4, 6)
    rows = x.flatten(2)
    cols = x.transpose(2, 3).flatten(2)
    expected = torch.stack([rows, cols, rows.flip(-1), cols.flip(-1)], dim=1)  # [B, 4, C, N]
    got = Scan("cross").to_sequences(tokens_of(x), (4, 6)).reshape(2, 4, 24, 3).transpose(2, 3)
    assert torch.equal(got, expected)


def test_cross_scan_3d_makes_each_axis_fastest_once():
    x = torch.arange(2 * 3 * 4).reshape(1, 1, 2, 3, 4).float()
    got = Scan("cross").to_sequences(tokens_of(x), (2, 3, 4))[:, :, 0]
    expected = [x.flatten(), x.permute(0, 1, 3, 4, 2).flatten(), x.permute(0, 1, 4, 2, 3).flatten()]
    expected += [e.flip(0) for e in expected]
    assert torch.equal(got, torch.stack(expected))


def test_bidirectional_and_tri_oriented_orders():
    x = torch.randn(1, 2, 3, 4, 5)
    raster = x.flatten(2)
    got = Scan("bidirectional").to_sequences(tokens_of(x), (3, 4, 5)).transpose(1, 2)
    assert torch.equal(got, torch.cat([raster, raster.flip(-1)]))
    # SegMamba's third direction: across slices, every in-plane position visiting all slices in turn
    inter_slice = x.permute(0, 1, 3, 4, 2).flatten(2)
    got = Scan("tri").to_sequences(tokens_of(x), (3, 4, 5)).transpose(1, 2)
    assert torch.equal(got, torch.cat([raster, raster.flip(-1), inter_slice]))


def test_strided_reorder():
    assert route_orders("strided", (10,), 4)[1].tolist() == [0, 4, 8, 1, 5, 9, 2, 6, 3, 7]
    assert route_orders("strided", (3,), 8)[1].tolist() == [0, 1, 2]


@pytest.mark.parametrize("shape", [(3, 4), (5, 1), (4, 3, 5), (2, 2, 2)], ids=str)
def test_zigzag_keeps_neighbours_adjacent(shape):
    order = route_orders("zigzag", shape)[0]
    grid = list(itertools.product(*(range(s) for s in shape)))
    for a, b in itertools.pairwise(order.tolist()):
        assert sum(abs(i - j) for i, j in zip(grid[a], grid[b])) == 1
    if shape == (3, 4):
        assert order.tolist() == [0, 1, 2, 3, 7, 6, 5, 4, 8, 9, 10, 11]


def test_merges():
    routed = torch.randn(2, 3, 5, 4)
    assert torch.allclose(RouteMerge("sum", 3, 4)(routed), routed[:, 0] + routed[:, 1] + routed[:, 2])
    assert torch.allclose(RouteMerge("mean", 3, 4)(routed), (routed[:, 0] + routed[:, 1] + routed[:, 2]) / 3)
    learned = RouteMerge("learned", 3, 4)
    with torch.no_grad():
        learned.weight.copy_(torch.tensor([[1.0], [0.0], [2.0]]).expand(3, 4))
    assert torch.allclose(learned(routed), routed[:, 0] + 2 * routed[:, 2])


def test_mistakes_are_named():
    with pytest.raises(MedstateError, match="unknown scan 'spiral'"):
        Scan("spiral")
    with pytest.raises(MedstateError, match="do not fill"):
        Scan("raster").to_sequences(torch.randn(1, 7, 2), (2, 3))
    with pytest.raises(MedstateError, match="1 to 3 positive sizes"):
        route_orders("raster", (2, 2, 2, 2))
    with pytest.raises(MedstateError, match="unknown route merge"):
        RouteMerge("max", 2, 3)
