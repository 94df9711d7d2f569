"""Runtime of planned sites. Importing the package registers the step ops whose runtime lives here."""
from . import bnb, masks  # noqa: F401  (register draw_mask, rng_state, redraw_mask, pack_bits, unpack_bits, dequantize)
