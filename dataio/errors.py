"""The errors of ``dataio``, in one leaf module every other one may import (it imports
nothing from the project).

The ``ValueError`` s are bad input, reported before or instead of any work (a command's
exit 2); :class:`DataError` and its kin stop a run whose data cannot be read as configured.
"""


class ConfigError(ValueError):
    """A configuration mistake, reported before any work starts."""


class ManifestError(ValueError):
    """A shard folder whose manifest is missing, malformed or names missing shards."""


class ShardWriteError(ValueError):
    """Shards cannot be written as asked (occupied output folder, no usable clips, ...)."""


class CacheError(ValueError):
    """The corpus cannot be cached as configured (exit 2)."""


class TarFormatError(ValueError):
    """A tar that cannot be read on from here (bad header checksum, member cut short)."""


class DataError(RuntimeError):
    """The data cannot be read as configured; the message says what to do."""


class RemoteError(DataError):
    """A URL that cannot be read: gone for good, refused, or still failing after the retries."""


class NoReadableClips(DataError):
    """A worker's shards yielded no sample at all."""


class ShardMismatch(DataError):
    """A shard that holds more members than its manifest lists, or a clip index beyond the
    corpus's ``num_clips``: the manifest was edited or belongs to other shards."""
