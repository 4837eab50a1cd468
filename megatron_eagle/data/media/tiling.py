"""Tile-grid selection for dynamic-resolution images: Image Area Preservation and InternVL's rule.

Pure functions over (width, height); the grid is chosen from metadata at planning time and
the decoder just applies it, so training is deterministic.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Literal

DEFAULT_TILE_SIZE = 448
DEFAULT_MAX_TILES = 12
# IAP caps the area term: grids keeping >= 60% of the original area get full credit.
IAP_AREA_CAP = 0.6

Grid = tuple[int, int]  # (cols, rows)


@lru_cache(maxsize=64)
def candidate_grids(max_tiles: int = DEFAULT_MAX_TILES, min_tiles: int = 1) -> tuple[Grid, ...]:
    """All (cols, rows) with min_tiles <= cols*rows <= max_tiles, smallest area first.

    Within one area, grids are ordered by cols so iteration order (and thus tie-breaking) is fixed.
    """
    if max_tiles < 1 or min_tiles < 1 or min_tiles > max_tiles:
        raise ValueError(f"need 1 <= min_tiles <= max_tiles, got {min_tiles}, {max_tiles}")
    grids = {(c, r) for c in range(1, max_tiles + 1) for r in range(1, max_tiles + 1)
             if min_tiles <= c * r <= max_tiles}
    return tuple(sorted(grids, key=lambda g: (g[0] * g[1], g[0])))


def num_tiles(grid: Grid) -> int:
    """Tiles fed to the vision encoder: the grid, plus a thumbnail when the grid has more than one tile."""
    n = grid[0] * grid[1]
    return n + 1 if n > 1 else n


def iap_score(width: int, height: int, grid: Grid, tile_size: int = DEFAULT_TILE_SIZE) -> float:
    """Eagle 2.5 Eq. 1: min(A_new/A_orig, 0.6) * min(r_t/r_orig, r_orig/r_t)."""
    cols, rows = grid
    area_ratio = (cols * rows * tile_size * tile_size) / float(width * height)
    r_orig, r_t = width / float(height), cols / float(rows)
    return min(area_ratio, IAP_AREA_CAP) * min(r_t / r_orig, r_orig / r_t)


def _choose_iap(width: int, height: int, grids: tuple[Grid, ...], tile_size: int) -> Grid:
    best, best_score = grids[0], -1.0
    for g in grids:  # smallest area first; strict '>' keeps the smaller grid on ties
        s = iap_score(width, height, g, tile_size)
        if s > best_score + 1e-12:
            best, best_score = g, s
    return best


def _choose_internvl(width: int, height: int, grids: tuple[Grid, ...], tile_size: int) -> Grid:
    # Closest aspect ratio; on an exact tie move to the larger grid only if the image
    # has more than half that grid's pixel area (InternVL's find_closest_aspect_ratio).
    r_orig = width / float(height)
    best, best_diff = grids[0], float("inf")
    for g in grids:
        diff = abs(r_orig - g[0] / float(g[1]))
        if diff < best_diff:
            best, best_diff = g, diff
        elif diff == best_diff and width * height > 0.5 * tile_size * tile_size * g[0] * g[1]:
            best = g
    return best


def choose_grid(width: int, height: int, max_tiles: int = DEFAULT_MAX_TILES,
                method: Literal["iap", "internvl"] = "iap", tile_size: int = DEFAULT_TILE_SIZE,
                min_tiles: int = 1) -> Grid:
    """Pick the tile grid ``(cols, rows)`` for a ``width`` x ``height`` image.

    ``method="iap"`` maximises Eagle 2.5's area-and-aspect score (ties go to the smaller grid);
    ``method="internvl"`` uses InternVL's closest-aspect-ratio rule. Memoised: planning calls it
    several times per image (once per tile cap ADS tries) over millions of images of few sizes.
    """
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    return _choose_grid(int(width), int(height), max_tiles, method, tile_size, min_tiles)


@lru_cache(maxsize=1 << 17)
def _choose_grid(width: int, height: int, max_tiles: int, method: str, tile_size: int, min_tiles: int) -> Grid:
    grids = candidate_grids(max_tiles, min_tiles)
    if method == "iap":
        return _choose_iap(width, height, grids, tile_size)
    if method == "internvl":
        return _choose_internvl(width, height, grids, tile_size)
    raise ValueError(f"unknown tiling method {method!r}; use 'iap' or 'internvl'")


def kept_area(width: int, height: int, grid: Grid, tile_size: int = DEFAULT_TILE_SIZE) -> float:
    """Fraction A_new / A_orig of the original pixel area the grid keeps (>1 means upsampling)."""
    return grid[0] * grid[1] * tile_size * tile_size / float(width * height)


def image_tokens(grid: Grid, tokens_per_tile: int) -> int:
    """Visual tokens of one image: every tile (thumbnail included) times tokens_per_tile."""
    return num_tiles(grid) * tokens_per_tile
