"""Uploads for ``audioclr shard --out URL`` and ``audioclr shard convert --out URL``: a
shard folder written locally is copied to an object store (any writable fsspec URL) as it
is written, the manifest last. Reading from a URL is :mod:`dataio.reading.remote`.
"""

from __future__ import annotations

import urllib.parse
from pathlib import Path

from dataio.errors import RemoteError
from dataio.reading.manifest import MANIFEST_NAME
from dataio.reading.remote import (
    BUILTIN_SCHEMES,
    CLOUD_EXTRA,
    CREDENTIALS_HINT,
    describe_no_credentials,
    no_credentials,
    shown,
)


def describe_store_error(url: str, err: BaseException) -> str:
    """One line for a failed write or listing at ``url``: what went wrong and what to check."""
    if no_credentials(err):
        return f"{shown(url)}: {describe_no_credentials(err)}"
    if isinstance(err, PermissionError):
        return (f"{shown(url)}: access denied ({str(err)[:200] or type(err).__name__}); check that these "
                f"credentials may write there ({CREDENTIALS_HINT})")
    return f"{shown(url)}: {type(err).__name__}: {str(err)[:200]}"


class Publisher:
    """Copies a shard folder written locally to a folder URL as it is written: each shard
    and its index as soon as they are complete (then removed locally, so staging holds one
    shard at a time), the manifest last, so a reader never finds a manifest before every
    shard it lists."""

    def __init__(self, url: str, overwrite: bool):
        scheme = urllib.parse.urlsplit(url).scheme
        if scheme in BUILTIN_SCHEMES:
            raise ValueError(f"--out {shown(url)}: http(s) URLs cannot be written; give an object store "
                             f"(s3://, gs://, any writable fsspec URL) or a folder")
        try:
            import fsspec  # deferred: the optional cloud extra
            self.fs, self.root = fsspec.core.url_to_fs(url)
        except ImportError as err:
            raise ValueError(f"--out {shown(url)}: writing {scheme}:// URLs needs the cloud extra: "
                             f"{CLOUD_EXTRA} ({err})") from None
        self.url, self.root = url.rstrip("/"), self.root.rstrip("/")
        try:
            held = self.fs.exists(f"{self.root}/{MANIFEST_NAME}")
            if not held:
                self.fs.makedirs(self.root, exist_ok=True)
        except Exception as err:  # noqa: BLE001 -- each client raises its own kinds; all are named
            raise RemoteError(f"--out {describe_store_error(url, err)}") from None
        if held and not overwrite:
            raise ValueError(f"--out {shown(url)} already holds a corpus (its {MANIFEST_NAME}); pass --overwrite "
                             f"to replace it")

    def put(self, local: Path) -> None:
        """Upload ``local`` into the folder URL, then remove it."""
        target = f"{self.url}/{local.name}"
        try:
            self.fs.put_file(str(local), f"{self.root}/{local.name}")
        except Exception as err:  # noqa: BLE001 -- as above
            raise RemoteError(f"uploading {describe_store_error(target, err)}") from None
        local.unlink()

    def shard(self, tar: Path, index: Path) -> None:
        self.put(tar)
        self.put(index)

    def finish(self, staging: Path) -> None:
        """Whatever else the writer left in ``staging`` (rejected and missing lists), then
        the manifest."""
        for path in sorted(staging.iterdir()):
            if path.name != MANIFEST_NAME and path.is_file():
                self.put(path)
        self.put(staging / MANIFEST_NAME)
