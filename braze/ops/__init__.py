"""braze::* custom ops (importing this package registers them)."""

from braze.ops import kv_compress as _kv_compress  # noqa: F401  (registers braze::kv_compress)
from braze.ops.collectives import COLLECTIVE_OPS
from braze.ops.conv_state import CONV_STATE_OPS
from braze.ops.convolution import CONV_OPS
from braze.ops.decode_layer import DECODE_LAYER_OPS
from braze.ops.library import BRAZE_OPS
from braze.ops.quant_ops import QUANT_OPS
from braze.ops.recurrent_state import RECURRENT_OPS

__all__ = ["BRAZE_OPS", "COLLECTIVE_OPS", "CONV_OPS", "CONV_STATE_OPS", "DECODE_LAYER_OPS", "QUANT_OPS",
           "RECURRENT_OPS"]
