"""One entry of `train.routes`: a span of blocks and the share of the tokens that skips it.

Several routes make a progressive schedule (a light route at the ends, a heavier one in the middle);
`train.route_ratio` / `route_start` / `route_end` is the one-route shorthand. Its docs are the recipe
reference's `train.routes[]` table.
"""

from __future__ import annotations

from dataclasses import dataclass

from .field_checks import below_one
from .options import opt


@dataclass
class RouteConfig:
    """One token route of `train.routes`."""

    ratio: float = opt(0.5, "Share of the tokens that skips this route's blocks (drawn afresh every step, apart "
                            "from the other routes' draws).", check=below_one)
    start: int = opt(2, "First block of the route (0-based; negative counts from the end).")
    end: int = opt(-2, "Last block of the route, inclusive (negative counts from the end).")
