"""What a new user hit (issue 23), each as it was met: a resume into another model's run
folder, files only their owner could read, launcher options torchrun asserts on, a
many-node launch that waited in silence, config values read the wrong way."""

import os
import re
import stat
import subprocess
from pathlib import Path

import pytest

from tests.conftest import PYTHON, REPO, cli_env, tiny_overrides


def _pretrain(shards: Path, run_dir: Path, *extra: str, umask: int | None = None, timeout: float = 300):
    cmd = [PYTHON, "-m", "trainer.cli.pretrain", *tiny_overrides(shards, run_dir), "train.max_steps=2", *extra]
    return subprocess.run(cmd, env=cli_env(), capture_output=True, text=True, timeout=timeout,
                          preexec_fn=(lambda: os.umask(umask)) if umask is not None else None)


def _snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): (p.stat().st_mtime_ns, p.stat().st_size)
            for p in sorted(folder.rglob("*"))}


@pytest.fixture(scope="module")
def finished_run(tiny_shards, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("finished") / "run"
    out = _pretrain(tiny_shards, run_dir, umask=0o027)
    assert out.returncode == 0, out.stderr[-3000:]
    return run_dir


@pytest.mark.e2e
def test_every_file_of_a_run_is_readable_as_the_umask_says(finished_run):
    modes = {str(p.relative_to(finished_run)): stat.S_IMODE(p.stat().st_mode) for p in finished_run.rglob("*")}
    assert "encoder.safetensors" in modes and "config.yaml" in modes
    files = {k: oct(m) for k, m in modes.items() if (finished_run / k).is_file() and m != 0o640}
    folders = {k: oct(m) for k, m in modes.items() if (finished_run / k).is_dir() and m != 0o750}
    assert not files and not folders, (files, folders)


@pytest.mark.e2e
def test_shards_and_evaluations_are_readable_as_the_umask_says(finished_run, tiny_shards, tmp_path):
    import numpy as np
    import soundfile as sf
    src = tmp_path / "src"
    for i in range(4):
        (src / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
        sf.write(src / f"c{i % 2}" / f"{i}.wav", np.random.default_rng(i).normal(0, 0.1, 8000), 16000)
    for args in (["shard", str(src), "--layout", "folder", "--out", str(tmp_path / "shards")],
                 ["eval", "--run", str(finished_run), "--data", str(tiny_shards), "eval.knn.k=3"]):
        out = subprocess.run([PYTHON, "-m", "trainer.cli", *args], env=cli_env(), capture_output=True, text=True,
                             timeout=300, preexec_fn=lambda: os.umask(0o027))
        assert out.returncode == 0, out.stderr[-2000:]
    logged = [line for line in out.stderr.splitlines() if " INFO " in line]  # eval logs as pretrain does
    assert logged and all(re.match(r"\d\d:\d\d:\d\d INFO [\w.]+: ", line) for line in logged), logged[:3]
    written = [*(tmp_path / "shards").rglob("*"), *(finished_run / "eval").rglob("*")]
    assert len(written) > 5
    wrong = {str(p): oct(stat.S_IMODE(p.stat().st_mode)) for p in written
             if stat.S_IMODE(p.stat().st_mode) != (0o640 if p.is_file() else 0o750)}
    assert not wrong, wrong


@pytest.mark.e2e
@pytest.mark.parametrize("change,words", [
    ("objective.name=moco", "objective.name: 'simclr' there, 'moco' here"),
    ("model.width=8", "model.width: 4 there, 8 here"),
    ("model.encoder=vgglike", "model.encoder: 'resnet18' there, 'vgglike' here")])
def test_a_resume_into_another_models_run_is_refused_and_changes_nothing(finished_run, tiny_shards, change, words):
    before = _snapshot(finished_run)
    out = _pretrain(tiny_shards, finished_run, change, "train.max_steps=4")
    assert out.returncode == 2, out.stderr[-3000:]
    assert "holds another model" in out.stderr and words in out.stderr, out.stderr[-3000:]
    assert "train.resume=none" in out.stderr and "new run_dir" in out.stderr
    assert "Traceback" not in out.stderr and not re.search(r"resume: \S+ was", out.stderr), "one message"
    assert _snapshot(finished_run) == before, "config.yaml and every other file as they were"


@pytest.mark.e2e
def test_a_batch_of_one_is_refused_where_the_negatives_come_from_the_batch(tiny_shards, tmp_path):
    out = _pretrain(tiny_shards, tmp_path / "run", "data.batch_size=1")
    assert out.returncode == 2 and "data.batch_size: objective simclr takes its negatives" in out.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.e2e
@pytest.mark.parametrize("option,words", [
    ("--nproc-per-node=0", "--nproc-per-node must be a positive number"),
    ("--nproc-per-node=abc", "--nproc-per-node must be a positive number"),
    ("--max-restarts=-1", "--max-restarts must be >= 0"),
    ("--nnodes=2:1", "--nnodes must be N or MIN:MAX")])
def test_launcher_options_torchrun_asserts_on_exit_2_with_a_line(option, words, tmp_path):
    out = subprocess.run([PYTHON, "-m", "trainer.cli", "launch", option, "pretrain", "--config",
                          "configs/demo.yaml"], env=cli_env(), capture_output=True, text=True, timeout=60,
                         cwd=REPO)
    assert out.returncode == 2 and words in out.stderr and "Traceback" not in out.stderr, out.stderr[-2000:]


@pytest.mark.e2e
def test_a_many_node_launch_says_what_it_waits_for(tmp_path):
    from tests.dist_utils import free_port
    port = free_port()
    out = subprocess.run([PYTHON, "-m", "trainer.cli", "launch", "--nnodes=2", "--nproc-per-node=1",
                          "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-conf",
                          "join_timeout=6", "pretrain", "data.backend=synthetic", f"run_dir={tmp_path / 'run'}"],
                         env=cli_env(), capture_output=True, text=True, timeout=120)
    assert f"waiting for 2 nodes to join at 127.0.0.1:{port} (gives up after 6 s" in out.stderr, out.stderr[-2000:]
    assert out.returncode == 1 and "did not join within the rendezvous timeout" in out.stderr
    assert "Traceback" not in out.stderr


@pytest.mark.parametrize("override,words", [
    ("data.sources=[{shards: /x, weight: .inf}]", "data.sources[0].weight: must be a finite number"),
    ("data.sources=[{shards: /x, weight: .nan}]", "data.sources[0].weight: must be a finite number"),
    ("optim.lr=.inf", "optim.lr: must be a finite number"),
    ("data.sources=[{shards: /x, weight: -1}]", "data.sources[0].weight: must be a positive number")])
def test_non_finite_and_negative_numbers_are_refused_by_key(override, words):
    from dataio.errors import ConfigError
    from trainer.train.config import PretrainConfig, load_config
    with pytest.raises(ConfigError) as err:
        load_config(PretrainConfig, REPO / "configs" / "demo.yaml", ["data.shards=", override])
    assert words in str(err.value)


def test_a_weight_written_1e_3_is_a_float_and_sources_replace_the_recipes_shards():
    from trainer.train.config import PretrainConfig, load_config
    recipe = REPO / "configs" / "demo.yaml"
    cfg = load_config(PretrainConfig, recipe, ["data.sources=[{shards: /a, weight: 1e-3}, {shards: /b}]"])
    assert cfg.data.shards == "" and [s["weight"] for s in cfg.data.sources] == [0.001, 1.0]
    from dataio.errors import ConfigError
    with pytest.raises(ConfigError, match="not both"):
        load_config(PretrainConfig, recipe, ["data.sources=[{shards: /a}]", "data.shards=/b"])


def test_the_cloud_extras_bound_what_the_resolver_would_backtrack_through():
    # boto3 1.43.N needs botocore >= 1.43.N, and s3fs's aiobotocore pins botocore below a
    # patch release: an unbounded boto3 (moto, awscli) sent pip backtracking for 17 minutes
    import configparser
    import importlib.metadata

    from packaging.requirements import Requirement
    cfg = configparser.ConfigParser()
    cfg.read(REPO / "setup.cfg")
    extras = cfg["options.extras_require"]
    for extra in ("cloud", "test"):
        reqs = {r.name: r for r in map(Requirement, filter(None, extras[extra].splitlines()))}
        assert {"aiobotocore", "boto3"} <= set(reqs), extra
        assert any(s.operator == "<" for s in reqs["aiobotocore"].specifier), extra
        (boto3_top,) = [s.version for s in reqs["boto3"].specifier if s.operator == "<"]
        try:
            installed = importlib.metadata.version("aiobotocore")
        except importlib.metadata.PackageNotFoundError:
            continue
        if reqs["aiobotocore"].specifier.contains(installed):
            (botocore,) = [Requirement(r) for r in importlib.metadata.requires("aiobotocore")
                           if Requirement(r).name == "botocore"]
            assert [s.version for s in botocore.specifier if s.operator == "<"] == [boto3_top], \
                "boto3's upper bound must be aiobotocore's botocore upper bound"


@pytest.mark.e2e
def test_a_full_disk_under_torch_save_reads_as_the_os_error_with_the_file(tmp_path):
    # torch's writer says "[enforce fail at inline_container.cc] unexpected pos"; the user
    # reads the OS's words and the file, and no half-written .tmp is left taking the space
    script = ("import resource, torch\n"
              "from pathlib import Path\n"
              "from trainer.safe_files import describe_error, save_tensors\n"
              "resource.setrlimit(resource.RLIMIT_FSIZE, (20000, 20000))\n"  # as a full disk (EFBIG)
              f"path = Path({str(tmp_path / 'state.pt')!r})\n"
              "try:\n"
              "    save_tensors(path, {'bank': torch.zeros(100000)})\n"
              "except OSError as err:\n"
              "    print(describe_error(err))\n")
    out = subprocess.run([PYTHON, "-c", script], env=cli_env(), capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == f"File too large ({tmp_path / 'state.pt'})", out.stdout + out.stderr[-2000:]
    assert not list(tmp_path.iterdir()), "neither the file nor its .tmp"


@pytest.mark.e2e
def test_sigterm_ends_an_evaluation_as_ctrl_c_does(encoder_run, tmp_path):
    import signal
    import time
    cmd = [PYTHON, "-m", "trainer.cli", "eval", "--run", str(encoder_run), "--data", str(encoder_run / "shards"),
           "--protocol", "finetune", "eval.finetune.epochs=500", "eval.finetune.batch_size=4"]
    proc = subprocess.Popen(cmd, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(12)  # into the fine-tuning
    assert proc.poll() is None, proc.communicate()[1][-2000:]
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    assert "audioclr eval: stopped; nothing was written" in err and "(SIGTERM)" in err and "Traceback" not in err


@pytest.mark.e2e
@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_every_command_ends_on_a_stop_signal_with_128_plus_n_and_a_line(tmp_path, sig):
    import signal
    import time
    number = getattr(signal, sig)
    proc = subprocess.Popen([PYTHON, "-m", "trainer.cli", "demo-corpus", "--out", str(tmp_path / "c"), "--clips",
                             "100000", "--workers", "1"], env=cli_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while not (tmp_path / "c").exists() and time.time() < deadline:
        time.sleep(0.2)
    time.sleep(1)
    proc.send_signal(number)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + number, err[-2000:]
    assert f"audioclr demo-corpus: stopped by {sig}" in err and "Traceback" not in err, err[-2000:]
    assert not (tmp_path / "c" / "manifest.json").exists()


@pytest.mark.e2e
@pytest.mark.parametrize("command", [["check-shards", "{long}"], ["demo-corpus", "--out", "{long}"],
                                     ["eval", "--run", "{long}", "--data", "{long}", "--protocol", "knn"]])
def test_a_path_too_long_for_the_os_is_bad_input_said_in_one_short_line(command, tmp_path):
    """A 5,000-character path is a typing accident: exit 2 like any bad input (it was 1),
    and the line names the path without printing all of it."""
    long = str(tmp_path / ("a" * 5000))
    done = subprocess.run([PYTHON, "-m", "trainer.cli", *[a.format(long=long) for a in command]], env=cli_env(),
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr[-1000:]
    lines = done.stderr.strip().splitlines()
    assert "File name too long" in lines[-1] and len(lines[-1]) < 400 and "Traceback" not in done.stderr, lines[-1]


def test_a_stop_inside_an_import_or_a_held_block_is_taken_once_it_ends(tmp_path, monkeypatch):
    """Issue 36 (the signal fuzzer): a stop raised inside an import can become the module's
    ImportError (a C extension's initialisation) and leave the module broken for good
    (optree, under torch.optim's lazy import of torch._dynamo: pretrain exited 1 with a
    traceback). Such a stop, and one inside ``stops_held()`` (``ray.init``), is taken as
    soon as the import or the block ends."""
    import signal
    import sys
    import time

    from dataio.stop_signal import stops_held
    from trainer.commands import sigterm_stops, stop_handled

    (tmp_path / "slow_to_import.py").write_text(
        "import os, signal, time\nos.kill(os.getpid(), signal.SIGINT)\ntime.sleep(0.3)\nWHOLE = True\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    taken = []
    for block in ("import", "held"):
        with sigterm_stops():
            try:
                if block == "import":
                    import slow_to_import  # noqa: F401
                else:
                    with stops_held():
                        os.kill(os.getpid(), signal.SIGINT)
                        time.sleep(0.3)
                taken.append(block)  # the block ended whole, the stop not yet taken
                time.sleep(5)
            except KeyboardInterrupt:
                stop_handled()
                taken.append("stopped")
    sys.modules.pop("slow_to_import", None)
    assert taken == ["import", "stopped", "held", "stopped"]


@pytest.mark.e2e
def test_a_stop_as_a_worker_is_spawned_waits_for_the_worker_to_get_its_work(monkeypatch, capfd):
    """The long signal fuzzer (seed 2: demo-corpus stopped by SIGTERM 0.7 s in): a stop that
    came between a pool worker's exec and its parent writing it what to run left the worker
    reading an empty pipe: its "EOFError: Ran out of input" traceback followed the command's
    line. A worker's start is now whole before the stop is taken."""
    import multiprocessing.util
    import signal
    import time

    from dataio.workers import shut_down, worker_pool
    from trainer.commands import sigterm_stops, stop_handled

    spawn = multiprocessing.util.spawnv_passfds

    def then_stop(path, args, passfds):
        pid = spawn(path, args, passfds)
        if "--multiprocessing-fork" in args:  # a worker (not the resource tracker): it runs, its work not yet written
            os.kill(os.getpid(), signal.SIGTERM)
        return pid

    monkeypatch.setattr(multiprocessing.util, "spawnv_passfds", then_stop)
    pool = worker_pool(1)
    with sigterm_stops():
        try:
            pool.submit(abs, -1)  # starts the worker
            time.sleep(5)
        except KeyboardInterrupt:
            stop_handled()
        finally:
            monkeypatch.undo()
            processes = list(pool._processes.values())
            shut_down(pool)
    assert processes and all(p.exitcode is not None for p in processes), "the worker started whole, and ended"
    assert "Traceback" not in capfd.readouterr().err


def test_the_last_line_after_a_stop_or_an_error_starts_a_line_of_its_own(capsys):
    """The signal fuzzer (issue 36): demo-corpus stopped while its progress bar was drawn
    printed "shard:   0%|...| 0/120 [...]audioclr demo-corpus: stopped by SIGTERM" as one
    line. The bars still drawn are closed first, so the command's line stands alone."""
    import signal

    import tqdm

    from dataio.stop_signal import Stopped
    from trainer.commands import report_stop, run_guarded

    def work_with_a_bar(fail):
        def work():
            bar = tqdm.tqdm(total=10, desc="shard")
            bar.update(1)
            raise fail
        return work

    assert report_stop("audioclr x", Stopped(signal.SIGTERM), "stopped by {signal}") == 143
    for fail, status in ((Stopped(signal.SIGTERM), 143), (ValueError("bad value"), 2)):
        capsys.readouterr()
        assert run_guarded("audioclr x", work_with_a_bar(fail)) == status
        lines = capsys.readouterr().err.replace("\r", "\n").splitlines()
        assert lines[-1].startswith("audioclr x: "), lines[-3:]
        assert not tqdm.tqdm._instances, "the bar is closed"


def test_a_line_a_bar_left_open_is_ended_before_the_stop_line(capsys):
    """The long signal fuzzer: `shard convert` stopped 1 s in printed "convert:   0%|...|"
    and the stop line on one line: the stop cut the bar's own close short (it had left the
    bars' list, its newline unwritten). What was written last is tracked instead."""
    import signal
    import sys

    from dataio.stop_signal import Stopped
    from trainer.commands import run_guarded

    def work():
        sys.stderr.write("convert:   0%|          | 0/240 [00:00<?, ?clip/s]")  # a bar, its line open
        raise Stopped(signal.SIGINT)

    assert run_guarded("audioclr x", work) == 130
    err = capsys.readouterr().err
    assert err.endswith("clip/s]\naudioclr x: stopped by SIGINT; nothing half-written is kept under a final name "
                        "(rerun the command)\n"), err[-300:]
