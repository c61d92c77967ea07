"""The errors the index raises for bad input, damaged or incompatible index folders and model mismatches.

Every message names the file, folder or value at fault and says what to do; the command line prints
the message and exits with status 2 instead of a traceback. Internal invariants use `assert`.
"""

from __future__ import annotations

from ovis_batch.errors import UsageError


class RetrievalIndexError(UsageError):
    """Base class: a problem the user can fix (input, index folder, model), not a bug."""


class EmbeddingInputError(RetrievalIndexError):
    """The embedding Parquet cannot be indexed: missing, empty, malformed, mixed or bad vectors."""


class IndexFolderError(RetrievalIndexError):
    """The index folder is missing, damaged, locked, or written by an incompatible format version."""


class IncompatibleEmbeddingsError(RetrievalIndexError):
    """Vectors come from another model, embedding strategy or dimension than the index holds."""
