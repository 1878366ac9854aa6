"""Cross-layer transcoders: the on-disk format, lazy decoders, encode/decode."""

from pie_lib.clt.io import load_clt, save_clt, save_transcoder
from pie_lib.clt.transcoder import CLTConfig, CrossLayerTranscoder, fvu, mean_l0

__all__ = ["CLTConfig", "CrossLayerTranscoder", "fvu", "load_clt", "mean_l0", "save_clt", "save_transcoder"]
