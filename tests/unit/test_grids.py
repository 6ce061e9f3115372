"""Sample grids: cells upscaled intact, with a gutter between them."""
import io

import numpy as np
import torch
from PIL import Image

from ict_scale.train.grids import GUTTER_PX, GUTTER_VALUE, grid_png


def test_grid_cells_are_intact_and_separated_by_a_gutter():
    images = torch.randint(0, 255, (5, 3, 4, 4), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    grid = np.asarray(Image.open(io.BytesIO(grid_png(images, upscale=2))))
    cell, g = 8, GUTTER_PX
    assert g in (1, 2) and grid.shape == (2 * cell + g, 3 * cell + 2 * g, 3)  # 3 columns, 2 rows
    for i in range(5):
        r, k = divmod(i, 3)
        top, left = r * (cell + g), k * (cell + g)
        expected = images[i].repeat_interleave(2, 1).repeat_interleave(2, 2).permute(1, 2, 0).numpy()
        assert np.array_equal(grid[top:top + cell, left:left + cell], expected), i
    gutter = np.zeros(grid.shape[:2], bool)
    gutter[cell:cell + g, :] = True
    for k in (1, 2):
        gutter[:, k * (cell + g) - g:k * (cell + g)] = True
    assert (grid[gutter] == GUTTER_VALUE).all()
