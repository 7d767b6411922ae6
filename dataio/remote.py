"""Shards and manifests behind a URL, read as streams.

``data.shards`` may be a local folder or a URL of one: ``http(s)://`` is read with the
standard library; any other scheme (``s3://``, ``gs://``, ...) through fsspec and the
provider's client, which come with ``pip install -e '.[cloud]'`` and take their
credentials from the usual places (environment, the provider's config files). A read
that fails on the way (a reset connection, a timeout, a 5xx or 429 answer) is retried
with exponential back-off from the byte where it stopped; an answer that will not change
(404, 401, 403) fails at once. Either way the error names the URL, with any user name,
password or query string (signed URLs carry secrets there) left out.
"""

from __future__ import annotations

import http.client
import io
import logging
import socket
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from dataio.errors import RemoteError
from dataio.tar_reader import local_tar_samples

log = logging.getLogger(__name__)

BUILTIN_SCHEMES = ("http", "https")
CLOUD_EXTRA = "pip install -e '.[cloud]'"


@dataclass(frozen=True)
class Retry:
    """How hard a read tries: ``attempts`` in all, sleeping ``backoff`` x 2^k between them
    (capped at ``max_sleep``), each request waiting at most ``timeout`` seconds."""

    attempts: int = 6
    backoff: float = 0.5
    max_sleep: float = 8.0
    timeout: float = 30.0

    @classmethod
    def of(cls, data) -> Retry:
        """The retry settings of a ``DataConfig`` (``data.remote_attempts``, ``data.remote_timeout``)."""
        return cls(attempts=data.remote_attempts, timeout=data.remote_timeout)

    def sleep(self, failures: int) -> float:
        return min(self.backoff * 2 ** (failures - 1), self.max_sleep)


def is_url(location) -> bool:
    return "://" in str(location)


def join(root: str, name: str) -> str:
    """``name`` (a shard, the manifest) inside the folder URL ``root``."""
    parts = urllib.parse.urlsplit(root)
    path = parts.path.rstrip("/") + "/" + name
    return urllib.parse.urlunsplit(parts._replace(path=path))


def shown(url: str) -> str:
    """``url`` fit for a log line: no user, password, query or fragment."""
    parts = urllib.parse.urlsplit(str(url))
    if not parts.scheme:
        return str(url)
    host = parts.hostname or ""
    if parts.port:
        host += f":{parts.port}"
    return urllib.parse.urlunsplit((parts.scheme, host, parts.path, "", ""))


def open_stream(url: str, retry: Retry = Retry()) -> io.RawIOBase:
    """A forward-only binary stream of ``url``'s bytes that survives transient failures."""
    scheme = urllib.parse.urlsplit(url).scheme
    if scheme in BUILTIN_SCHEMES:
        return _Resuming(_HttpSource(url, retry.timeout), url, retry)
    return _Resuming(_FsspecSource(url), url, retry)


def tar_samples(location, handler, retry: Retry = Retry()):
    """The samples (webdataset dicts) of one tar shard, a local path (members as
    memoryviews, JSON as bytes) or a URL (streamed, members as bytes); ``handler`` sees
    each read error (a RemoteError is raised again, whatever it says)."""
    import webdataset as wds

    def handle(exc: Exception) -> bool:
        if isinstance(exc, RemoteError):  # webdataset appends (stream, url) to its args: the sentence only
            raise RemoteError(exc.args[0]) from None
        return handler(exc)
    if not is_url(location):  # memory-mapped, members as memoryviews (dataio.tar_reader)
        return local_tar_samples(location, handle)
    files = wds.tariterators.tar_file_expander([{"url": location, "stream": open_stream(location, retry)}],
                                               handler=handle)
    return wds.tariterators.group_by_keys(files, handler=handle)


def sizes(urls: list[str], timeout: float = 30.0) -> dict[str, int | None]:
    """Each URL's size in bytes, None where it is not there, left out where the store would
    not say (the reads retry those): one HEAD request per object over HTTP (16 at a time),
    one listing per folder through fsspec."""
    found: dict[str, int | None] = {}
    http = [u for u in urls if urllib.parse.urlsplit(u).scheme in BUILTIN_SCHEMES]
    if http:
        from concurrent.futures import ThreadPoolExecutor
        with ThreadPoolExecutor(16) as pool:
            for url, size in zip(http, pool.map(lambda u: _head(u, timeout), http)):
                if size != -1:
                    found[url] = size
    by_folder: dict[str, list[str]] = {}
    for url in (u for u in urls if u not in http):
        by_folder.setdefault(url.rsplit("/", 1)[0], []).append(url)
    for folder, members in by_folder.items():
        try:
            import fsspec
            fs, path = fsspec.core.url_to_fs(folder)
            listing = {e["name"].rstrip("/").rsplit("/", 1)[-1]: e.get("size") for e in fs.ls(path, detail=True)}
        except Exception:  # noqa: BLE001 -- a store that cannot list: the reads will say
            continue
        for url in members:
            found[url] = listing.get(url.rsplit("/", 1)[-1])
    return found


def _head(url: str, timeout: float) -> int | None:
    """Content-Length of ``url`` (None: not there; -1: unknown)."""
    try:
        with urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout) as response:
            length = response.headers.get("Content-Length")
            return int(length) if length is not None else -1
    except urllib.error.HTTPError as err:
        return None if err.code in (404, 410) else -1
    except (OSError, http.client.HTTPException, ValueError):
        return -1


def read_bytes(url: str, retry: Retry = Retry()) -> bytes:
    with open_stream(url, retry) as stream:
        return stream.read()


# The clients' "no credentials" errors (botocore, google-auth, azure): no retry finds any.
NO_CREDENTIALS = {"NoCredentialsError", "PartialCredentialsError", "CredentialRetrievalError", "ProfileNotFound",
                  "DefaultCredentialsError", "ClientAuthenticationError", "CredentialUnavailableError"}
CREDENTIALS_HINT = ("S3: AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE and ~/.aws/credentials "
                    "(AWS_ENDPOINT_URL for an S3-compatible store); GCS: GOOGLE_APPLICATION_CREDENTIALS")


def no_credentials(err: BaseException) -> bool:
    return any(cls.__name__ in NO_CREDENTIALS for cls in type(err).__mro__)


def describe_no_credentials(err: BaseException) -> str:
    return f"no credentials for this store ({type(err).__name__}: {str(err)[:200]}); give them: {CREDENTIALS_HINT}"


def describe_store_error(url: str, err: BaseException) -> str:
    """One line for a failed write or listing at ``url``: what went wrong and what to check."""
    if no_credentials(err):
        return f"{shown(url)}: {describe_no_credentials(err)}"
    if isinstance(err, PermissionError):
        return (f"{shown(url)}: access denied ({str(err)[:200] or type(err).__name__}); check that these "
                f"credentials may write there ({CREDENTIALS_HINT})")
    return f"{shown(url)}: {type(err).__name__}: {str(err)[:200]}"


class _Permanent(Exception):
    """A failure a retry will not mend."""


class _HttpSource:
    transient = (OSError, http.client.HTTPException, socket.timeout, TimeoutError, ConnectionError)

    def __init__(self, url: str, timeout: float):
        self.url, self.timeout = url, timeout

    def open(self, offset: int):
        """(a response positioned at ``offset``, bytes to discard first)."""
        headers = {"Range": f"bytes={offset}-"} if offset else {}
        try:
            response = urllib.request.urlopen(urllib.request.Request(self.url, headers=headers),
                                              timeout=self.timeout)
        except urllib.error.HTTPError as err:
            if err.code in (408, 429) or err.code >= 500:
                raise OSError(f"HTTP {err.code} {err.reason}") from None
            raise _Permanent(f"HTTP {err.code} {err.reason}") from None
        # a server without range support answers 200 with the whole body: skip to offset
        return response, offset if offset and response.status == 200 else 0


class _FsspecSource:
    # the clients' own error types vary (botocore, aiohttp, google-auth); a missing object
    # or a refusal is told apart when the object is opened, the rest is worth a retry
    transient = (Exception,)

    def __init__(self, url: str):
        try:
            import fsspec
            self.fs, self.path = fsspec.core.url_to_fs(url)
        except ImportError as err:
            raise RemoteError(f"{shown(url)}: reading {urllib.parse.urlsplit(url).scheme}:// URLs needs "
                              f"the cloud extra: {CLOUD_EXTRA} ({err})") from None
        except ValueError as err:  # an unknown scheme
            raise RemoteError(f"{shown(url)}: {err}") from None

    def open(self, offset: int):
        try:
            handle = self.fs.open(self.path, "rb")
        except FileNotFoundError:
            raise _Permanent("not found") from None
        except PermissionError as err:
            raise _Permanent(f"access denied ({type(err).__name__})") from None
        if offset:
            handle.seek(offset)
        return handle, 0


class _Resuming(io.RawIOBase):
    """Reads ``source`` from the start; when a read fails it reopens the source at the
    byte where it stopped, up to ``retry.attempts`` tries in a row without progress."""

    def __init__(self, source, url: str, retry: Retry):
        self.source, self.url, self.retry = source, url, retry
        self.offset, self.failures, self.handle = 0, 0, None
        self.started = time.monotonic()

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        while True:
            try:
                if self.handle is None:
                    self.handle, discard = self.source.open(self.offset)
                    while discard:
                        got = self.handle.read(min(discard, 1 << 20))
                        if not got:
                            raise OSError("the body ended before the resume point")
                        discard -= len(got)
                data = self.handle.read(len(buffer))
                if len(buffer) and not data and self._short():
                    raise OSError("the connection closed before the end of the body")
                buffer[:len(data)] = data
                self.offset += len(data)
                self.failures = 0 if data else self.failures
                return len(data)
            except _Permanent as err:
                self.close()
                raise RemoteError(f"{shown(self.url)}: {err}; check data.shards and that the object is there "
                                  f"and readable with these credentials") from None
            except self.source.transient as err:
                self._drop()
                if no_credentials(err):
                    self.close()
                    raise RemoteError(f"{shown(self.url)}: {describe_no_credentials(err)}") from None
                self.failures += 1
                if self.failures >= self.retry.attempts:
                    raise RemoteError(f"{shown(self.url)}: unreachable after {self.failures} tries "
                                      f"({time.monotonic() - self.started:.0f} s; last: {type(err).__name__}: "
                                      f"{str(err)[:200]})") from None
                wait = self.retry.sleep(self.failures)
                log.warning("reading %s failed at byte %d (%s); retry %d of %d in %.1f s", shown(self.url),
                            self.offset, type(err).__name__, self.failures, self.retry.attempts - 1, wait)
                time.sleep(wait)

    def _short(self) -> bool:
        """Whether an HTTP body ended before its announced length."""
        length = getattr(self.handle, "length", None)  # http.client: bytes still due, or None
        return bool(length)

    def _drop(self) -> None:
        handle, self.handle = self.handle, None
        if handle is not None:
            try:
                handle.close()
            except Exception:  # noqa: BLE001 -- a broken connection may fail to close; it is dropped anyway
                pass

    def close(self) -> None:
        self._drop()
        super().close()


class Publisher:
    """Copies a shard folder written locally to a folder URL as it is written: each shard
    and its index as soon as they are complete (then removed locally, so staging holds one
    shard at a time), the manifest last, so a reader never finds a manifest before every
    shard it lists."""

    def __init__(self, url: str, overwrite: bool):
        from dataio.manifest import MANIFEST_NAME
        scheme = urllib.parse.urlsplit(url).scheme
        if scheme in BUILTIN_SCHEMES:
            raise ValueError(f"--out {shown(url)}: http(s) URLs cannot be written; give an object store "
                             f"(s3://, gs://, any writable fsspec URL) or a folder")
        try:
            import fsspec
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
        self.sent = 0

    def put(self, local: Path) -> None:
        """Upload ``local`` into the folder URL, then remove it."""
        target = f"{self.url}/{local.name}"
        try:
            self.fs.put_file(str(local), f"{self.root}/{local.name}")
        except Exception as err:  # noqa: BLE001 -- as above
            raise RemoteError(f"uploading {describe_store_error(target, err)}") from None
        self.sent += local.stat().st_size
        local.unlink()

    def shard(self, tar: Path, index: Path) -> None:
        self.put(tar)
        self.put(index)

    def finish(self, staging: Path) -> None:
        """Whatever else the writer left in ``staging`` (rejected and missing lists), then
        the manifest."""
        from dataio.manifest import MANIFEST_NAME
        for path in sorted(staging.iterdir()):
            if path.name != MANIFEST_NAME and path.is_file():
                self.put(path)
        self.put(staging / MANIFEST_NAME)
