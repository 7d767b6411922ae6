"""One evaluation of an exported encoder: :class:`Evaluation` over the rounds of a protocol,
:func:`run_eval` writing ``RUN_DIR/eval/<DATA SET>/<protocol>.json``, its pictures and
``summary.md`` (the command: :mod:`trainer.cli.eval`)."""

from __future__ import annotations

import json
import logging
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from dataio.atomic import write_text_atomically
from dataio.errors import ConfigError
from dataio.reading.manifest import load_manifest
from trainer.evaluate.cache import cache_key, cached_embeddings
from trainer.evaluate.clips import ClipSet, load_clipset
from trainer.evaluate.config import EvalConfig
from trainer.evaluate.embed import ClipEmbeddings
from trainer.evaluate.protocol import RoundRunner, make_rounds, primary_metric
from trainer.evaluate.protocols import REGISTRY
from trainer.evaluate.protocols import protocol as protocol_named
from trainer.evaluate.ranks import embed_over_ranks
from trainer.models.export import build_from_meta, load_encoder
from trainer.parallel import distributed
from trainer.parallel.device import pick_device

log = logging.getLogger("audioclr.eval")


def check_rate(manifest, encoder_rate: int, run_dir: str | Path) -> None:
    """The one check of the sample rate: the shards' (their manifest's, the one source) against
    the rate the encoder in ``run_dir`` was trained on, before any decoding."""
    if manifest.sample_rate != encoder_rate:
        raise ConfigError(f"the shards in {manifest.where} are at {manifest.sample_rate} Hz but the encoder "
                          f"in {run_dir} was trained on {encoder_rate} Hz: re-shard with --sample-rate")


def patching(cfg: EvalConfig, meta: dict) -> tuple[float, float]:
    """(patch, hop) in seconds: ``eval.patch_seconds`` (default: the training view length)
    and ``eval.hop_seconds`` (default: half a patch)."""
    patch_s = cfg.patch_seconds or meta["view_seconds"]
    return patch_s, cfg.hop_seconds or patch_s / 2


def eval_folder(run_dir: str | Path, data: str | Path) -> Path:
    """``RUN_DIR/eval/<DATA SET>``: the results, pictures and kept embeddings of one encoder
    on one shard folder (named by the folder's last part, a URL's included)."""
    return Path(run_dir) / "eval" / Path(str(data)).resolve().name


def check_finite(emb: ClipEmbeddings, encoder_name: str) -> None:
    if not np.isfinite(emb.patches).all():
        raise ValueError(f"the encoder of {encoder_name} gives non-finite embeddings "
                         f"(NaN or inf weights?): nothing to evaluate")


def embeddings_of(encoder, frontend, meta: dict, clips: ClipSet, cfg: EvalConfig, device: torch.device,
                  cache_in: tuple[Path, Path] | None = None, name: str = "") -> tuple[ClipEmbeddings, bool]:
    """(the frozen ``encoder``'s embeddings of ``clips`` under ``cfg``, whether they were
    computed here); ``cache_in`` (run dir, eval folder) reads and keeps them in that eval
    folder (:mod:`trainer.evaluate.cache`) for the encoder exported in that run dir.
    Non-finite embeddings raise (naming the encoder ``name``) before they are kept. Under
    ``audioclr launch`` each rank embeds a share and every rank gets the whole; rank 0
    keeps it."""
    patch_s, hop_s = patching(cfg, meta)
    info = distributed.env_info() if distributed.is_initialized() else distributed.DistInfo()

    def compute() -> ClipEmbeddings:
        emb = embed_over_ranks(encoder, frontend, clips, info, patch_seconds=patch_s, hop_seconds=hop_s,
                               batch_size=cfg.embed_batch, device=device)
        check_finite(emb, name or str(cache_in[0] if cache_in else "this run"))
        return emb

    if cache_in is None:
        return compute(), True
    key = cache_key(cache_in[0], clips, frontend, patch=int(patch_s * clips.sample_rate),
                    hop=max(1, int(hop_s * clips.sample_rate)))
    emb, reused = cached_embeddings(cache_in[1], key, compute, keep=info.is_main)
    return emb, not reused


def frozen_embeddings(run_dir: str | Path, clips: ClipSet, cfg: EvalConfig) -> ClipEmbeddings:
    """The embeddings of ``clips`` by the encoder exported in ``run_dir``, as an
    :class:`Evaluation` of a frozen protocol computes them (a sweep computes them once),
    read from and kept in the run's eval folder of the clips' shard folder."""
    encoder, frontend, meta = load_encoder(run_dir)  # a sweep's preflight checked the rate
    cache_in = None if clips.manifest is None else (Path(run_dir), eval_folder(run_dir, clips.manifest.root))
    return embeddings_of(encoder, frontend, meta, clips, cfg, pick_device(cfg.device, key="eval.device"),
                         cache_in)[0]


class Evaluation:
    """One protocol on one saved encoder (or its architecture at random init) and one
    labelled shard folder, advanced an epoch at a time (``step``) so that Ray Tune can
    report and checkpoint between epochs."""

    def __init__(self, protocol: str, run_dir: str | Path, data: str | Path, cfg: EvalConfig,
                 random_init: bool = False, clips: ClipSet | None = None, frozen: ClipEmbeddings | None = None,
                 loaded: tuple | None = None, cache_dir: str | Path | None = None):
        """``clips`` (the shards' clips, loaded) and ``frozen`` (this encoder's embeddings
        of them under ``cfg``, :func:`frozen_embeddings`) are passed in by a sweep, which
        computes them once for all its trials; otherwise they are computed here
        (``embedded_here`` says which). ``loaded`` (encoder, frontend, meta) is a model in
        memory (the online probe's) instead of the export in ``run_dir``. ``cache_dir``: the
        eval folder where the export's frozen embeddings are read from and kept."""
        if protocol not in REGISTRY:
            raise ConfigError(f"unknown protocol '{protocol}': choose one of {', '.join(REGISTRY)}")
        self.protocol, self.cfg, self.data = protocol, cfg, str(data)
        self.encoder_name = "random_init" if random_init else str(run_dir)
        encoder, frontend, meta = loaded or load_encoder(run_dir)
        if random_init:
            torch.manual_seed(cfg.seed)
            encoder, frontend = build_from_meta(meta)
        if clips is None:  # a sweep passes them in, its preflight having checked the rate
            manifest = load_manifest(data)
            check_rate(manifest, frontend.sample_rate, run_dir)
            clips = load_clipset(manifest)  # no audio held: every protocol reads the shards again
        self.clips = clips
        self.device = pick_device(cfg.device, key="eval.device")
        patch_s, hop_s = patching(cfg, meta)
        self.patch = int(patch_s * clips.sample_rate)
        self.hop = max(1, int(hop_s * clips.sample_rate))
        self.rounds = make_rounds(self.clips, cfg.split, test_fraction=cfg.test_fraction,
                                  val_fraction=cfg.val_fraction, seed=cfg.seed, max_rounds=cfg.max_rounds,
                                  only_folds=cfg.folds)
        for r in self.rounds:
            log.info("%s: %d train, %d val, %d test clips", r.name, len(r.train), len(r.val), len(r.test))
        self.frozen: ClipEmbeddings | None = None
        self.embedded_here = False
        self.encoder, self.frontend = encoder, frontend
        spec = protocol_named(protocol)
        if spec.frozen:
            if frozen is None:
                keep = None if cache_dir is None or random_init or loaded else (Path(run_dir), Path(cache_dir))
                frozen, self.embedded_here = embeddings_of(encoder, frontend, meta, clips, cfg, self.device, keep,
                                                           self.encoder_name)
            check_finite(frozen, self.encoder_name)
            if frozen.num_clips != len(clips):
                raise ValueError(f"embeddings of {frozen.num_clips} clips given for {len(clips)} clips")
            self.frozen = frozen
        self.runner = RoundRunner(self.clips, self.rounds, lambda i, r: spec.learner(self, i, r), spec.epochs(cfg))

    @property
    def done(self) -> bool:
        return self.runner.done

    @property
    def metric(self) -> str:
        return primary_metric(self.clips)

    def step(self) -> dict:
        return self.runner.step()

    def run(self) -> dict:
        while not self.done:
            self.step()
        return self.result()

    def result(self) -> dict:
        out = self.runner.result()
        tested = out.pop("tested_rows")
        predictions = out.pop("predictions", None)
        clips = self.clips
        if predictions is not None:
            out["predictions"] = {clips.keys[r]: clips.class_names[p] for r, p in zip(tested, predictions)}
        out["tested"] = [clips.keys[r] for r in tested]
        return {"protocol": self.protocol, "encoder": self.encoder_name, "data": self.data,
                "num_clips": len(clips), "num_classes": clips.num_classes, "multilabel": clips.multilabel,
                "class_names": clips.class_names, "primary_metric": self.metric,
                "round_sizes": {r.name: {"train": len(r.train), "val": len(r.val), "test": len(r.test)}
                                for r in self.rounds},
                **out, "history": self.runner.history, "settings": asdict(self.cfg)}

    def tsne_embeddings(self) -> np.ndarray:
        """[N, D] clip embeddings to picture: the frozen encoder's, or for fine-tuning the
        first round's fine-tuned encoder's."""
        if self.frozen is not None:
            return self.frozen.clip_means()
        return self.runner.learners[0].embeddings(np.arange(len(self.clips))).clip_means()

    def state_dict(self) -> dict:
        return self.runner.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.runner.load_state_dict(state)


PICTURES = ("curves", "confusion", "tsne")  # a result's pictures: <stem>_<picture>.png


def picture_name(stem: str, picture: str) -> str:
    return f"{stem}_{picture}.png"


def draw_pictures(evaluation: Evaluation, result: dict, eval_dir: Path, stem: str) -> dict[str, str]:
    """Learning curves (trained protocols), confusion matrix (single-label) and t-SNE PNGs
    in ``eval_dir``; returns {picture: file name}."""
    from trainer.evaluate import plots  # deferred: plots imports matplotlib, slow to import

    clips, pictures = evaluation.clips, {}
    title = f"{evaluation.protocol} - {evaluation.encoder_name}"
    if evaluation.runner.epochs > 1:
        keep = ("epoch", "train_loss", f"val_{evaluation.metric}", f"test_{evaluation.metric}")
        history = {name: [{k: v for k, v in row.items() if k in keep} for row in rows]
                   for name, rows in result["history"].items()}
        pictures["learning_curves"] = picture_name(stem, "curves")
        plots.plot_learning_curves(history, eval_dir / pictures["learning_curves"], title)
    if "predictions" in result:
        row_of = {k: i for i, k in enumerate(clips.keys)}
        rows = np.array([row_of[k] for k in result["predictions"]])
        predicted = np.array([clips.class_names.index(c) for c in result["predictions"].values()])
        counts = plots.confusion_matrix(clips.labels[rows], predicted, clips.num_classes)
        pictures["confusion"] = picture_name(stem, "confusion")
        plots.plot_confusion(counts, clips.class_names, eval_dir / pictures["confusion"], title)
    if plots.plot_tsne(evaluation.tsne_embeddings(), clips.labels, clips.class_names,
                       eval_dir / picture_name(stem, "tsne"), title, seed=evaluation.cfg.seed):
        pictures["tsne"] = picture_name(stem, "tsne")
    return pictures


def write_outputs(evaluation: Evaluation, result: dict, eval_dir: str | Path, stem: str) -> Path:
    """``eval_dir/<stem>.json``; with ``eval.pictures`` its PNGs before it and ``summary.md``
    after it. A stop or an error before the JSON removes the pictures of a new result."""
    eval_dir = Path(eval_dir)
    eval_dir.mkdir(parents=True, exist_ok=True)
    path = eval_dir / f"{stem}.json"
    new = not path.exists()
    try:
        result["pictures"] = draw_pictures(evaluation, result, eval_dir, stem) if evaluation.cfg.pictures else {}
        write_text_atomically(path, json.dumps(result, indent=1, default=float))
    except BaseException:
        if new and not path.exists():
            for picture in PICTURES:
                (eval_dir / picture_name(stem, picture)).unlink(missing_ok=True)
        raise
    if evaluation.cfg.pictures:
        from trainer.evaluate.plots import write_summary  # deferred: as above (matplotlib)

        write_summary(eval_dir)
    return path


def result_stem(eval_dir: Path, stem: str, overwrite: bool) -> str:
    """``stem``, or when ``eval_dir/<stem>.json`` exists and ``overwrite`` is off, the first
    free ``stem-2``, ``stem-3``, ...: an earlier result is never replaced unasked."""
    if overwrite or not (eval_dir / f"{stem}.json").exists():
        return stem
    n = 2
    while (eval_dir / f"{stem}-{n}.json").exists():
        n += 1
    return f"{stem}-{n}"


def run_eval(run_dir: str | Path, data: str | Path, cfg: EvalConfig, protocol: str = "knn",
             random_init: bool = False, overwrite: bool = False) -> dict:
    """Evaluate the exported encoder of ``run_dir`` (or its architecture at random init)
    and write ``run_dir/eval/<data set>/<protocol>[_random_init].json`` with its pictures,
    the data set being the shard folder's name (``result["file"]`` says where)."""
    eval_dir = eval_folder(run_dir, data)
    evaluation = Evaluation(protocol, run_dir, data, cfg, random_init, cache_dir=eval_dir)
    if not distributed.env_info().is_main:  # under audioclr launch: the embedding was the shared part
        return {}
    result = evaluation.run()
    stem = result_stem(eval_dir, protocol + ("_random_init" if random_init else ""), overwrite)
    result["file"] = str(write_outputs(evaluation, result, eval_dir, stem))
    return result


def headline(result: dict) -> str:
    m = result["primary_metric"]
    stats = result["metrics"][m]
    others = ", ".join(f"{k} {v['mean']:.4f}" for k, v in result["metrics"].items() if k != m)
    return (f"{result['protocol']} {m}: {stats['mean']:.4f} +- {stats['std']:.4f} over "
            f"{len(result['rounds'])} round(s) ({others})")
