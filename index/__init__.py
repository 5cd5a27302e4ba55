"""Reference index: FAISS k-NN, per-class mean distance, calibrated confidence, unknown flagging.

Imports neither ``app`` nor ``training``. See :mod:`index.reference_index` for the design.
"""

from index.errors import EmptyIndexError, IndexFileError
from index.reference_index import IndexResult, Neighbor, ReferenceIndex

__all__ = ["EmptyIndexError", "IndexFileError", "IndexResult", "Neighbor", "ReferenceIndex"]
