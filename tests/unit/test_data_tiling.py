import itertools

import pytest

from megatron_eagle.data.media.tiling import candidate_grids, choose_grid, iap_score, image_tokens, kept_area, num_tiles


def test_paper_example_iap_vs_internvl():
    assert choose_grid(2000, 1300, max_tiles=12, method="iap") == (4, 3)
    assert choose_grid(2000, 1300, max_tiles=12, method="internvl") == (3, 2)
    assert kept_area(2000, 1300, (4, 3)) == pytest.approx(0.926, abs=0.005)
    assert kept_area(2000, 1300, (3, 2)) == pytest.approx(0.463, abs=0.005)


@pytest.mark.parametrize("size,iap,internvl", [((3840, 2160), (4, 3), (4, 2)), ((1920, 1080), (4, 2), (4, 2)),
                                               ((800, 600), (4, 3), (4, 3))])
def test_reference_cases(size, iap, internvl):
    assert choose_grid(*size) == iap
    assert choose_grid(*size, method="internvl") == internvl


def test_ties_go_to_the_smaller_grid():
    # 448x448: (1,1) and (2,2) both score 0.6 (area capped, aspect exact) -> (1,1)
    assert iap_score(448, 448, (1, 1)) == pytest.approx(iap_score(448, 448, (2, 2)))
    assert choose_grid(448, 448) == (1, 1)
    assert choose_grid(896, 896) == (2, 2)  # (3,3) ties with (2,2)


def test_candidates_and_caps():
    grids = candidate_grids(12)
    assert len(grids) == 35 and len(set(grids)) == 35
    assert [g[0] * g[1] for g in grids] == sorted(g[0] * g[1] for g in grids)
    for w, h in itertools.product([50, 333, 1000, 4000], [60, 700, 2500]):
        for cap in (1, 2, 4, 6, 8, 12):
            for method in ("iap", "internvl"):
                c, r = choose_grid(w, h, max_tiles=cap, method=method)
                assert 1 <= c * r <= cap
    assert choose_grid(5000, 100, max_tiles=1) == (1, 1)


def test_iap_is_the_argmax_with_smallest_area_on_ties():
    for w, h in itertools.product([97, 448, 1000, 1313, 2999], [113, 448, 777, 2048]):
        g = choose_grid(w, h)
        best = iap_score(w, h, g)
        for other in candidate_grids(12):
            s = iap_score(w, h, other)
            assert s <= best + 1e-12
            if abs(s - best) < 1e-12:
                assert other[0] * other[1] >= g[0] * g[1]


def test_tile_size_is_a_parameter():
    # the tiny preset's 112 px tiles see a 4x smaller image the same way 448 px tiles see the big one
    assert choose_grid(500, 325, tile_size=112) == (4, 3)
    assert choose_grid(500, 325, tile_size=448) != (4, 3)


def test_tile_and_token_counts():
    assert num_tiles((1, 1)) == 1 and num_tiles((2, 1)) == 3 and num_tiles((4, 3)) == 13
    assert image_tokens((4, 3), 256) == 3328
    assert image_tokens((1, 1), 16) == 16


def test_bad_arguments():
    with pytest.raises(ValueError):
        choose_grid(0, 10)
    with pytest.raises(ValueError):
        choose_grid(10, 10, method="nearest")
