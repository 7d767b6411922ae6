"""Shards behind a URL, served over HTTP on loopback by the test itself: training streams
them (retrying a cut connection) to the weights the local folder gives; a server gone
mid-run, a missing manifest, a refusal, a scheme without its client: named errors, no hang."""

import functools
import http.server
import importlib.util
import subprocess
import threading
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import PYTHON, checkpoint_weights, cli_env, tiny_overrides
from tests.dist_utils import free_port

STEPS = 8


class _Handler(http.server.SimpleHTTPRequestHandler):
    """Files of the server's folder; faults on request: the first read of every shard cut
    after 3,000 bytes, 503 for everything after ``down_after`` requests, 403 under
    /forbidden/. Like Python's own file server it ignores Range headers."""

    def log_message(self, *args) -> None:
        pass

    def do_HEAD(self) -> None:
        with self.server.lock:
            self.server.heads += 1
            hang = self.server.hang_heads_after and self.server.heads > self.server.hang_heads_after
        if hang:  # a store that stops answering: the client's timeout decides
            time.sleep(3)
        super().do_HEAD()

    def do_GET(self) -> None:
        srv = self.server
        with srv.lock:
            srv.requests += 1
            count = srv.requests
        if self.path.startswith("/forbidden/"):
            self.send_error(403)
        elif srv.down_after and count > srv.down_after:
            self.send_error(503)
        elif srv.cut_first and self.path.endswith(".tar") and self.path not in srv.cut:
            srv.cut.add(self.path)
            data = Path(srv.folder, self.path.lstrip("/")).read_bytes()
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data[:3000])
            self.close_connection = True
        else:
            super().do_GET()


@pytest.fixture
def serve():
    servers = []

    def start(folder: Path, cut_first: bool = False, down_after: int = 0) -> str:
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0),
                                                 functools.partial(_Handler, directory=str(folder)))
        server.folder, server.cut_first, server.down_after = str(folder), cut_first, down_after
        server.lock, server.requests, server.heads, server.cut = threading.Lock(), 0, 0, set()
        server.hang_heads_after = 0
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}"
    start.servers = servers
    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def _pretrain(shards: str, run_dir: Path, *extra, timeout: float = 300) -> subprocess.CompletedProcess:
    args = [a for a in tiny_overrides(Path("x"), run_dir) if not a.startswith("data.shards=")]
    return subprocess.run([PYTHON, "-m", "trainer.cli.pretrain", f"data.shards={shards}", *args,
                           f"train.max_steps={STEPS}", *extra], env=cli_env(), capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.e2e
def test_training_from_a_url_equals_training_from_the_folder(tiny_shards, tmp_path, serve):
    url = serve(tiny_shards, cut_first=True)  # every shard's first read breaks off mid-member
    local = _pretrain(str(tiny_shards), tmp_path / "local")
    assert local.returncode == 0, local.stderr[-3000:]
    remote = _pretrain(url + "/", tmp_path / "remote")
    assert remote.returncode == 0, remote.stderr[-3000:]
    assert "failed at byte" in remote.stderr and "retry 1 of 5" in remote.stderr, "the cut reads were retried"
    final = f"checkpoints/step_{STEPS:08d}"
    a, b = checkpoint_weights(tmp_path / "local" / final), checkpoint_weights(tmp_path / "remote" / final)
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.e2e
def test_a_server_gone_mid_run_stops_it_with_the_url_named_and_a_checkpoint(tiny_shards, tmp_path, serve):
    url = serve(tiny_shards, down_after=4)  # the manifest and three shards, then 503 for good
    out = _pretrain(url, tmp_path / "run", "train.max_steps=1000", "train.ckpt_every=1000",
                    "data.remote_attempts=3", "data.shuffle_buffer=4", timeout=180)
    assert out.returncode == 1, out.stderr[-3000:]
    assert "Traceback" not in out.stderr
    assert f"{url}/shard-0000" in out.stderr and "unreachable after 3 tries" in out.stderr, out.stderr[-3000:]
    assert "HTTP 503" in out.stderr
    assert "object at 0x" not in out.stderr, "the one sentence, not webdataset's argument tuple"
    saved = [p.name for p in (tmp_path / "run" / "checkpoints").iterdir()]
    assert len(saved) == 1 and 0 < int(saved[0].split("_")[1]) < 1000, saved
    assert "saving a checkpoint first" in out.stderr


@pytest.mark.e2e
@pytest.mark.parametrize("where,words", [
    ("{url}/nothing/", "no shard manifest at {url}/nothing/manifest.json: HTTP 404"),
    ("{url}/forbidden/", "no shard manifest at {url}/forbidden/manifest.json: HTTP 403"),
    ("http://user:secret@127.0.0.1:{port}/x?sig=secret", "http://127.0.0.1:{port}/x/manifest.json: unreachable "
                                                           "after 2 tries"),
    pytest.param("gs://bucket/corpus", "gs://bucket/corpus/manifest.json: reading gs:// URLs needs the cloud "
                 "extra: pip install -e '.[cloud]'", marks=pytest.mark.skipif(
                     importlib.util.find_spec("gcsfs") is not None, reason="the cloud extra is installed"))])
def test_urls_that_cannot_be_read_are_named_before_training(tiny_shards, tmp_path, serve, where, words):
    url, port = serve(tiny_shards), free_port()  # nothing listens on port
    out = _pretrain(where.format(url=url, port=port), tmp_path / "run", "data.remote_attempts=2", timeout=120)
    assert out.returncode == 2, out.stderr[-3000:]
    assert words.format(url=url, port=port) in out.stderr, out.stderr[-3000:]
    assert "secret" not in out.stderr and "Traceback" not in out.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()


needs_dali = pytest.mark.skipif(importlib.util.find_spec("nvidia.dali") is None, reason="needs nvidia-dali")


@pytest.mark.e2e
@needs_dali
def test_dali_trains_from_a_url_through_a_node_cache_fetched_once(tiny_shards, tmp_path, serve):
    url = serve(tiny_shards, cut_first=True)
    cache = f"data.cache_dir={tmp_path / 'cache'}"
    local = _pretrain(str(tiny_shards), tmp_path / "local", "data.backend=dali")
    assert local.returncode == 0, local.stderr[-3000:]
    remote = _pretrain(url, tmp_path / "remote", "data.backend=dali", cache)
    assert remote.returncode == 0, remote.stderr[-3000:]
    final = f"checkpoints/step_{STEPS:08d}"
    a, b = checkpoint_weights(tmp_path / "local" / final), checkpoint_weights(tmp_path / "remote" / final)
    assert all(torch.equal(a[k], b[k]) for k in a), "DALI reads the cached copy as it reads the folder"
    (corpus,) = [p for p in (tmp_path / "cache").iterdir() if p.is_dir()]
    assert (corpus / ".complete").is_file() and len(list(corpus.glob("*.tar"))) == 4
    stamp = (corpus / "shard-00000.tar").stat().st_mtime_ns
    again = _pretrain(url, tmp_path / "again", "data.backend=dali", cache)
    assert again.returncode == 0 and (corpus / "shard-00000.tar").stat().st_mtime_ns == stamp, "fetched once"
    tiny = _pretrain(url, tmp_path / "tiny", "data.backend=dali", cache, "data.cache_gb=0.0001")
    assert tiny.returncode == 2 and "data.cache_gb: the corpus at" in tiny.stderr and "Traceback" not in tiny.stderr


@pytest.mark.e2e
@needs_dali
def test_two_ranks_of_a_node_share_one_fetch(tiny_shards, tmp_path, serve):
    url = serve(tiny_shards)
    args = [a for a in tiny_overrides(Path("x"), tmp_path / "run") if not a.startswith("data.shards=")]
    out = subprocess.run([PYTHON, "-m", "torch.distributed.run", "--nproc-per-node=2", "--master-addr=127.0.0.1",
                          f"--master-port={free_port()}", "-m", "trainer.cli.pretrain", f"data.shards={url}", *args,
                          "data.backend=dali", f"data.cache_dir={tmp_path / 'cache'}", "train.max_steps=2"],
                         env=cli_env(), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    # rank 0 reads the manifest and hands it over; every shard (and index file, where there
    # are some) is fetched once, by one of the two
    files = [p for p in tiny_shards.iterdir() if p.name != "manifest.json"]
    assert len(files) >= 4 and serve.servers[0].requests == 1 + len(files)


@pytest.mark.e2e
def test_the_shard_cache_evicts_the_corpus_used_longest_ago(tmp_path, serve):
    import os

    from dataio.reading.manifest import load_manifest
    from dataio.reading.shard_cache import localize
    from tests.shard_utils import make_shards
    folders = [tmp_path / name for name in ("a", "b", "c")]
    for i, folder in enumerate(folders):
        make_shards(folder, [3, 3], seconds=0.3, seed=i)
    size = sum(p.stat().st_size for p in folders[0].iterdir() if p.suffix in (".tar", ".idx"))
    limit = 2.5 * size / (1 << 30)  # room for two corpora, not three
    cached = []
    for i, folder in enumerate(folders):
        local = localize(load_manifest(serve(folder)), tmp_path / "cache", limit)
        os.utime(local.root / ".used", (1000 + i, 1000 + i))  # a, then b, then c: a is the oldest
        cached.append(local.root)
        if i == 1:  # b used again: a stays the oldest
            assert load_manifest(local.root).num_clips == 6
    assert not cached[0].exists() and cached[1].exists() and cached[2].exists()


@pytest.mark.e2e
def test_a_corpus_replaced_at_its_url_is_fetched_again(tmp_path, serve, caplog):
    import shutil

    from dataio.reading.manifest import load_manifest
    from dataio.reading.shard_cache import localize
    from tests.shard_utils import make_shards
    folder = tmp_path / "corpus"
    make_shards(folder, [3, 3], seconds=0.3, seed=0)
    url = serve(folder)
    first = localize(load_manifest(url), tmp_path / "cache", 1.0)
    old = (first.root / "shard-00000.tar").read_bytes()
    shutil.rmtree(folder)
    make_shards(folder, [4, 4], seconds=0.3, seed=1)  # the same URL, another corpus
    again = localize(load_manifest(url), tmp_path / "cache", 1.0)
    assert again.root == first.root and "changed since it was cached" in caplog.text
    assert load_manifest(again.root).num_clips == 8
    assert (again.root / "shard-00000.tar").read_bytes() == (folder / "shard-00000.tar").read_bytes() != old


@pytest.mark.e2e
def test_two_ranks_from_a_url_train_what_two_ranks_from_the_folder_train(tiny_shards, tmp_path, serve):
    url = serve(tiny_shards, cut_first=True)
    runs = {}
    for name, shards in (("local", str(tiny_shards)), ("remote", url)):
        args = [a for a in tiny_overrides(Path("x"), tmp_path / name) if not a.startswith("data.shards=")]
        out = subprocess.run([PYTHON, "-m", "torch.distributed.run", "--nproc-per-node=2", "--master-addr=127.0.0.1",
                              f"--master-port={free_port()}", "-m", "trainer.cli.pretrain", f"data.shards={shards}",
                              *args,
                              "train.max_steps=4"], env=cli_env(), capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-3000:]
        runs[name] = checkpoint_weights(tmp_path / name / "checkpoints" / "step_00000004")
    assert all(torch.equal(runs["local"][k], runs["remote"][k]) for k in runs["local"])
    assert serve.servers[0].heads == 4, "each shard URL checked once per launch, not once per rank (issue 35, item 7)"


@pytest.mark.e2e
def test_evaluation_reads_shards_from_a_url_as_from_the_folder(tmp_path, serve):
    from tests.conftest import export_random_encoder
    from tests.shard_utils import make_shards
    from trainer.evaluate.config import EvalConfig, KnnConfig
    from trainer.evaluate.run import Evaluation

    make_shards(tmp_path / "shards", [12, 12], seconds=1.0)
    export_random_encoder(tmp_path, width=4)
    url = serve(tmp_path / "shards", cut_first=True)
    cfg = EvalConfig(pictures=False, knn=KnnConfig(k=5))
    local = Evaluation("knn", tmp_path, tmp_path / "shards", cfg).run()
    remote = Evaluation("knn", tmp_path, url, cfg).run()
    assert remote["metrics"] == local["metrics"] and sorted(remote["tested"]) == sorted(local["tested"])


def test_any_fsspec_url_streams_the_same_samples(tiny_shards):
    """file:// goes through fsspec, as s3:// or gs:// do (with the cloud extra)."""
    from dataio.reading.manifest import load_manifest
    from dataio.reading.streams import raw_samples
    local, remote = load_manifest(tiny_shards), load_manifest(f"file://{tiny_shards}")
    assert remote.remote and remote.where == f"file://{tiny_shards}"
    ids = list(range(len(local.shards)))
    a, b = list(raw_samples(local, ids, [])), list(raw_samples(remote, ids, []))
    assert len(a) == 24 and [(s["__key__"], s["flac"]) for s in a] == [(s["__key__"], s["flac"]) for s in b]


@pytest.mark.e2e
def test_check_shards_and_bench_data_read_a_url(tiny_shards, tmp_path, serve):
    url = serve(tiny_shards)
    out = subprocess.run([PYTHON, "-m", "trainer.cli", "check-shards", url], env=cli_env(), capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0 and "4 shard(s) checked: 0 problem(s)" in out.stderr, out.stderr[-2000:]
    out = subprocess.run([PYTHON, "-m", "trainer.cli", "bench", "data", "--shards", url, "--backends", "torch,dali",
                          "--seconds", "1", "--cores", "1", "--batch-size", "4"],
                         env=dict(cli_env(), AUDIOCLR_CACHE=str(tmp_path / "cache")), capture_output=True, text=True,
                         timeout=180)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "torch" in out.stdout and "dali" in out.stdout


@pytest.fixture
def s3_server(monkeypatch):
    """An S3-compatible server (moto) on loopback, reached only through its HTTP endpoint;
    the environment tells every S3 client in this process and its children where it is."""
    moto_server = pytest.importorskip("moto.server")
    pytest.importorskip("s3fs")
    port = free_port()
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "FSSPEC_S3_ENDPOINT_URL": f"http://127.0.0.1:{port}"}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.mark.e2e
def test_training_from_an_s3_compatible_store_equals_training_from_the_folder(tiny_shards, tmp_path, s3_server):
    import boto3
    client = boto3.client("s3", endpoint_url=s3_server)
    client.create_bucket(Bucket="audio")
    files = sorted(p for p in tiny_shards.iterdir() if p.name != "manifest.json")
    for path in [*files, tiny_shards / "manifest.json"]:  # the manifest last, as `audioclr shard` does
        client.upload_file(str(path), "audio", f"corpus/{path.name}")
    local = _pretrain(str(tiny_shards), tmp_path / "local")
    assert local.returncode == 0, local.stderr[-3000:]
    remote = _pretrain("s3://audio/corpus", tmp_path / "remote")
    assert remote.returncode == 0, remote.stderr[-3000:]
    final = f"checkpoints/step_{STEPS:08d}"
    a, b = checkpoint_weights(tmp_path / "local" / final), checkpoint_weights(tmp_path / "remote" / final)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert "testing" not in remote.stderr, "no credential is logged"
    gone = _pretrain("s3://audio/nothing", tmp_path / "gone")
    assert gone.returncode == 2 and "no shard manifest at s3://audio/nothing/manifest.json: not found" in gone.stderr


@pytest.mark.e2e
def test_missing_credentials_fail_at_once_by_name(tmp_path, s3_server, monkeypatch):
    import time

    from dataio.errors import ManifestError
    from dataio.reading.manifest import load_manifest
    from dataio.reading.remote import Retry
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    start = time.monotonic()
    with pytest.raises(ManifestError) as err:
        load_manifest("s3://audio/corpus", retry=Retry(attempts=5, backoff=2.0))
    assert time.monotonic() - start < 5, "not retried: no retry finds credentials"
    assert "s3://audio/corpus/manifest.json: no credentials for this store (NoCredentialsError" in str(err.value)
    assert "AWS_ACCESS_KEY_ID" in str(err.value)


def test_a_refused_upload_names_the_url_and_the_credentials(tiny_shards, tmp_path, monkeypatch, capsys):
    from fsspec.implementations.local import LocalFileSystem

    from trainer.cli import main as cli_main

    def forbidden(self, *args, **kwargs):  # what s3fs raises for HTTP 403 on a wrong secret
        raise PermissionError("Forbidden")
    monkeypatch.setattr(LocalFileSystem, "put_file", forbidden)
    src = tmp_path / "src"
    for i in range(2):
        (src / f"c{i}").mkdir(parents=True)
    import numpy as np
    import soundfile as sf
    for i in range(4):
        sf.write(src / f"c{i % 2}" / f"{i}.wav", np.zeros(8000, np.float32), 16000)
    out = f"file://{tmp_path / 'bucket'}"
    assert cli_main(["shard", str(src), "--layout", "folder", "--out", out]) == 2
    err = capsys.readouterr().err
    assert f"uploading {out}/shard-00000.tar: access denied (Forbidden)" in err, err
    assert "AWS_ACCESS_KEY_ID" in err and "Traceback" not in err


@pytest.mark.e2e
def test_a_manifest_that_does_not_match_its_shards_is_named_before_training(tiny_shards, tmp_path, serve):
    import shutil
    copy = tmp_path / "copy"
    shutil.copytree(tiny_shards, copy)
    (copy / "shard-00001.tar").unlink()
    (copy / "shard-00002.tar").write_bytes((tiny_shards / "shard-00002.tar").read_bytes()[:5000])
    url = serve(copy)
    out = _pretrain(url, tmp_path / "run", timeout=120)
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-3000:]
    assert f"manifest {url}/manifest.json does not match its shards: shard-00001.tar (not there), " \
           f"shard-00002.tar (5000 bytes, the manifest says" in out.stderr, out.stderr[-3000:]
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.e2e
def test_decode_free_formats_stream_from_a_url_and_convert_from_one(tiny_shards, tmp_path, serve):
    from dataio.frontend import FrontendConfig
    from dataio.writing.convert import convert_corpus
    from dataio.writing.shard_writer import Encoding

    pcm = tmp_path / "pcm16"
    convert_corpus(tiny_shards, str(pcm), Encoding("pcm16"), workers=1, progress=False)
    url = serve(pcm, cut_first=True)
    local = _pretrain(str(pcm), tmp_path / "local")
    remote = _pretrain(url, tmp_path / "remote")
    assert local.returncode == 0 and remote.returncode == 0, remote.stderr[-3000:]
    assert "retry 1 of 5" in remote.stderr
    final = f"checkpoints/step_{STEPS:08d}"
    a, b = checkpoint_weights(tmp_path / "local" / final), checkpoint_weights(tmp_path / "remote" / final)
    assert all(torch.equal(a[k], b[k]) for k in a)
    from_url = convert_corpus(url, str(tmp_path / "mel-url"), Encoding("logmel", FrontendConfig(n_mels=32)),
                              workers=1, progress=False)
    from_folder = convert_corpus(pcm, str(tmp_path / "mel"), Encoding("logmel", FrontendConfig(n_mels=32)),
                                 workers=1, progress=False)
    assert from_url.clip_format == "logmel" and [s.bytes for s in from_url.shards] == \
        [s.bytes for s in from_folder.shards]
    for name in ("shard-00000.tar", "shard-00003.tar"):
        assert (tmp_path / "mel-url" / name).read_bytes() == (tmp_path / "mel" / name).read_bytes()


def test_a_store_that_stops_answering_mid_check_is_left_to_the_reads(tmp_path, serve, caplog):
    """Issue 35: the start-up check of 2,000 shard URLs against a store that stopped
    answering would wait out every HEAD's timeout (2,000 / 16 x 30 s). After the first one
    times out the rest are left to the reads (which retry and name the URL), with a warning."""
    import logging

    from dataio.reading.remote import sizes
    from tests.shard_utils import make_shards

    make_shards(tmp_path / "s", [1] * 48, seconds=0.05)
    url = serve(tmp_path / "s")
    serve.servers[0].hang_heads_after = 3
    urls = [f"{url}/shard-{i:05d}.tar" for i in range(48)]
    start = time.perf_counter()
    with caplog.at_level(logging.WARNING, logger="dataio.reading.remote"):
        found = sizes(urls, timeout=0.5)
    assert time.perf_counter() - start < 2.5 and serve.servers[0].heads <= 3 + 16 + 2
    assert 3 <= len(found) < 48 and all(size and size > 0 for size in found.values())
    assert "stopped answering HEAD requests" in caplog.text
