"""Shards and manifests behind a URL, read as streams.

``data.shards`` may be a local folder or a URL of one: ``http(s)://`` is read with the
standard library; any other scheme (``s3://``, ``gs://``, ...) through fsspec and the
provider's client, which come with ``pip install -e '.[cloud]'`` and take their
credentials from the usual places (environment, the provider's config files). A read
that fails on the way (a reset connection, a timeout, a 5xx or 429 answer) is retried
with exponential back-off from the byte where it stopped; an answer that will not change
(404, 401, 403) fails at once. Either way the error names the URL, with any user name,
password or query string (signed URLs carry secrets there) left out. Writing a corpus to
a URL is :mod:`dataio.writing.publish`.
"""

from __future__ import annotations

import http.client
import io
import logging
import socket
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from dataio.errors import RemoteError
from dataio.reading.tar_reader import local_tar_samples

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
    import webdataset as wds  # deferred: heavy, and only this function uses it

    def handle(exc: Exception) -> bool:
        if isinstance(exc, RemoteError):  # webdataset appends (stream, url) to its args: the sentence only
            raise RemoteError(exc.args[0]) from None
        return handler(exc)
    if not is_url(location):  # memory-mapped, members as memoryviews (dataio.reading.tar_reader)
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
        gone = threading.Event()  # a HEAD that timed out: the store stopped answering

        def head(url: str) -> int | None:
            if gone.is_set():
                return -1
            size = _head(url, timeout)
            if size == _TIMED_OUT:
                gone.set()
            return size
        with ThreadPoolExecutor(16) as pool:
            for url, size in zip(http, pool.map(head, http)):
                if size is None or size >= 0:
                    found[url] = size
        if gone.is_set():
            log.warning("the store stopped answering HEAD requests (%.0f s each) after %d of %d shard URLs; the "
                        "rest are checked as they are read", timeout, len(found), len(http))
    by_folder: dict[str, list[str]] = {}
    for url in (u for u in urls if u not in http):
        by_folder.setdefault(url.rsplit("/", 1)[0], []).append(url)
    for folder, members in by_folder.items():
        try:
            import fsspec  # deferred: the optional cloud extra
            fs, path = fsspec.core.url_to_fs(folder)
            listing = {e["name"].rstrip("/").rsplit("/", 1)[-1]: e.get("size") for e in fs.ls(path, detail=True)}
        except Exception:  # noqa: BLE001 -- a store that cannot list: the reads will say
            continue
        for url in members:
            found[url] = listing.get(url.rsplit("/", 1)[-1])
    return found


_TIMED_OUT = -2


def _head(url: str, timeout: float) -> int | None:
    """Content-Length of ``url`` (None: not there; -1: unknown; _TIMED_OUT: no answer in
    ``timeout`` seconds)."""
    try:
        with urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout) as response:
            length = response.headers.get("Content-Length")
            return int(length) if length is not None else -1
    except urllib.error.HTTPError as err:
        return None if err.code in (404, 410) else -1
    except TimeoutError:
        return _TIMED_OUT
    except urllib.error.URLError as err:
        return _TIMED_OUT if isinstance(err.reason, TimeoutError) else -1
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
            import fsspec  # deferred: the optional cloud extra
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
