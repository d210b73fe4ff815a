"""The offline demonstration: HubbleCLIP and AstroLLaVA on a procedural sky.

:func:`run_demo` generates a labelled synthetic sky, trains a small CLIP from
scratch (and the shuffled-caption control), measures top-10% retrieval
accuracy, indexes the validation images together with real telescope images
shipped inside installed packages, runs text searches and zero-shot
classification; then trains a small AstroLLaVA on the same sky, scores its
captions like the paper and re-ranks the searches with it
(:mod:`astrovl.demo.astrollava`); and writes a self-contained HTML report and
``results.json``.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["run_demo", "DemoResult", "DEMO_QUERIES", "DEMO_QUERY_CLASSES", "bundled_real_images", "follow_up_command",
           "serve_command"]

log = logging.getLogger(__name__)

#: The demo's text queries, and the synthetic classes each asks for (the hits of precision at 10).
DEMO_QUERY_CLASSES = {
    "barred spiral galaxy with prominent arms": ("barred_spiral",),
    "dense globular star cluster": ("globular_cluster",),
    "gravitational lens arc around a massive galaxy": ("lens",),
    "edge-on disk galaxy": ("edge_on_disk", "edge_on_bulge"),
    "glowing nebula with filaments": ("nebula",),
    "two merging galaxies": ("merger",),
}

DEMO_QUERIES = tuple(DEMO_QUERY_CLASSES)


@dataclass
class DemoResult:
    """What :func:`run_demo` produced."""

    report_path: Path
    summary: object  # astropy Table: model, top10, random
    output_dir: Path
    searches: dict = field(default_factory=dict)
    zero_shot: object = None
    seconds: float = 0.0
    index_path: Path | None = None
    search_command: str = ""
    #: the command that shares the demo's index on a local web page
    serve_command: str = ""
    #: ``results.json``: the report's figures for programs
    results_path: Path | None = None
    #: the AstroLLaVA part (:class:`astrovl.demo.astrollava.AstroLLaVADemo`), None when it did not run
    llava: object = None
    #: why the AstroLLaVA part did not run ("" when it ran)
    llava_note: str = ""


def bundled_real_images() -> list[tuple[str, object]]:
    """Real telescope images that ship inside installed packages.

    Returns ``(name, image_input)`` pairs: astropy's M13 and NGC 1316 test images
    (FITS with WCS) and, when scikit-image is installed, the Hubble eXtreme Deep
    Field. Missing ones are skipped.
    """
    import astropy

    base = Path(astropy.__file__).parent
    out: list[tuple[str, object]] = []
    candidates = [
        ("M13 (astropy test image)", base / "io/fits/hdu/compressed/tests/data/m13.fits"),
        ("NGC 1316 (astropy test image)", base / "io/fits/tests/data/comp.fits"),
    ]
    for name, path in candidates:
        if path.exists():
            out.append((name, str(path)))
    try:
        from skimage import data as skdata

        out.append(("Hubble eXtreme Deep Field (scikit-image)", skdata.hubble_deep_field()))
    except Exception:  # scikit-image missing or its data not shipped
        log.info("scikit-image Hubble Deep Field not available; skipped")
    return out


def _materialize_real_images(real: list[tuple[str, object]], directory: Path) -> list[tuple[str, Path]]:
    """Copy the bundled real images into ``directory`` (arrays as PNG) so the index names files."""
    import shutil

    import numpy as np
    from PIL import Image

    from ..utils.files import atomic_write

    directory.mkdir(parents=True, exist_ok=True)
    out = []
    for name, obj in real:
        if isinstance(obj, (str, os.PathLike)):
            target = directory / Path(obj).name
            if not target.exists():
                with open(obj, "rb") as src, atomic_write(target, "wb") as dst:
                    shutil.copyfileobj(src, dst)
        else:
            slug = "".join(ch if ch.isalnum() else "_" for ch in name.split("(")[0].strip().lower())
            target = directory / f"{slug.strip('_')}.png"
            if not target.exists():
                with atomic_write(target, "wb") as dst:
                    Image.fromarray(np.asarray(obj)).save(dst, format="PNG")
        out.append((name, target))
    return out


def _quiet_progress():
    from ..config import conf

    return conf.set_temp("progress", False)


@dataclass
class _Settings:
    """The resolved sizes of one demo run."""

    steps: int
    n_images: int
    image_size: int
    mode: str
    lr: float
    warmup: int
    weight_decay: float


def _settings(steps, n_images, image_size, quick: bool, model) -> _Settings:
    steps = steps or (60 if quick else 400)
    if model is not None:
        return _Settings(steps, n_images or (330 if quick else 1100), image_size, "finetune", 1e-5,
                         min(100, steps // 10), 1e-3)
    return _Settings(steps, n_images or (330 if quick else 1100), image_size, "scratch", 1e-3,
                     min(30, steps // 10), 0.1)


def _base_clip(model, pretrained, settings: _Settings, *, device, seed):
    """The CLIP to train: a named one to fine-tune, or the small one from scratch."""
    from ..clip import TINY_CLIP_CONFIG, CLIPEmbedder

    if model is not None:
        base = CLIPEmbedder.from_pretrained(model, pretrained, device=device)
        settings.image_size = max(settings.image_size, base.image_size)
        return base
    return CLIPEmbedder.from_config(TINY_CLIP_CONFIG, device=device, seed=seed)


def _train_clips(base, train, val, out: Path, settings: _Settings, *, device, seed, progress) -> dict:
    """The CLIP of the demo and its shuffled-caption control."""
    from ..training import CLIPTrainingConfig, train_clip

    runs = {}
    for name, run_mode in ((settings.mode, settings.mode), ("shuffled captions (control)", "shuffled")):
        cfg = CLIPTrainingConfig(mode=run_mode, steps=settings.steps, batch_size=32, lr=settings.lr,
                                 warmup_steps=settings.warmup, weight_decay=settings.weight_decay,
                                 eval_every=max(1, settings.steps // 4), best_metric="val_top10",
                                 output_dir=str(out / "runs" / run_mode), device=device, seed=seed,
                                 progress=progress, tensorboard=False,
                                 overwrite=True)  # running the demo again replaces its runs
        runs[name] = train_clip(base, train, val, cfg)
    return runs


def _score_clips(runs: dict, val):
    """Top-10% retrieval accuracy of each run on the validation split, and the retrieval curves."""
    from astropy.table import Table

    from ..evaluation.retrieval import retrieval_curve, top_k_percent_accuracy

    rows, curves = [], {}
    val_caps = val.captions
    for name, res in runs.items():
        emb = res.embedder
        img = emb.embed_images(val, progress=False)
        txt = emb.embed_text(val_caps)
        rows.append({"model": name,
                     "top10_image_to_text": top_k_percent_accuracy(img, txt, 10.0),
                     "top10_text_to_image": top_k_percent_accuracy(img, txt, 10.0, direction="text_to_image"),
                     "random": 0.10, "n_val": len(val)})
        curves[name] = retrieval_curve(img, txt)
    return Table(rows=rows), curves


def _build_index(out: Path, embedder, val):
    """Index the validation images and the bundled real images; save it to ``OUT/index``.

    The images are copied next to the data, so that the index names files under
    the output directory, relative to it; the trained model was loaded from its
    run directory, so the index records where it is and ``astrovl search
    OUT/index "text"`` works without naming the model.
    """
    from astropy.table import Table

    from ..clip import EmbeddingIndex

    real = _materialize_real_images(bundled_real_images(), out / "data" / "real")
    items = [str(p) for p in val.image_paths] + [str(p) for _, p in real]
    meta = Table({"name": [f"{r['id']} ({r['label']})" for r in val] + [n for n, _ in real],
                  "label": [str(r["label"]) for r in val] + ["real image"] * len(real),
                  "kind": ["synthetic"] * len(val) + ["real"] * len(real),
                  "path": [os.path.relpath(p, out) for p in items]})
    index = EmbeddingIndex.build(embedder, items, metadata=meta, progress=False, image_root=out / "data")
    index.save(out / "index")
    return index, items, real


def _make_data(out: Path, settings: _Settings, *, seed, progress):
    """The labelled synthetic sky of the run, in ``OUT/data`` (80% train, 20% validation)."""
    from ..datasets import SyntheticSkyDataset

    log.info("generating %d synthetic sky images", settings.n_images)
    return SyntheticSkyDataset.generate(out / "data", n_images=settings.n_images, image_size=settings.image_size,
                                        seed=seed, val_fraction=0.2, progress=progress)


@dataclass
class _Searches:
    """What the index step shows: the text searches, their thumbnails, and zero-shot classification."""

    searches: dict
    thumbs: dict
    zero_shot: object
    real: list


def _search_index(out: Path, trained, val, class_prompts: dict) -> _Searches:
    """Index the validation and real images, run the demo's text searches, classify the real images."""
    from ..imaging import load_image

    index, items, real = _build_index(out, trained, val)
    thumbs = {i: load_image(obj) for i, obj in enumerate(items)}
    searches = {q: index.search(q, k=6) for q in DEMO_QUERIES}
    zs = (trained.zero_shot([obj for _, obj in real], categories=list(class_prompts.values()), top_k=3)
          if real else None)
    return _Searches(searches, thumbs, zs, real)


def _llava_part(out: Path, ds, embedder, *, llava: bool, quick: bool, seed, device, progress):
    """The AstroLLaVA part, or ``(None, why it did not run)``."""
    if not llava:
        return None, "skipped (--skip-llava)"
    from .astrollava import AstroLLaVASettings, llava_unavailable, run_astrollava

    missing = llava_unavailable()
    if missing:
        log.warning("AstroLLaVA part skipped: %s", missing)
        return None, missing
    settings = AstroLLaVASettings.quick() if quick else AstroLLaVASettings()
    return run_astrollava(out, ds, embedder, out / "index", seed=seed, device=device, settings=settings,
                          progress=progress), ""


def _write_report(out: Path, *, settings: _Settings, trained, runs, summary, curves, train, val,
                  shown: _Searches, llava_result, llava_note, seconds: float) -> Path:
    from ..evaluation.retrieval import plot_retrieval_curve
    from ..imaging import load_image
    from ..reporting import HTMLReport
    from ..training.common import plot_history

    searches, thumbs, zs, real = shown.searches, shown.thumbs, shown.zero_shot, shown.real
    report = HTMLReport("astrovl demo: image-text retrieval on a procedural sky")
    report.paragraph(
        f"A CLIP model ({trained.model_name}, {settings.mode}) was trained for {settings.steps} steps on "
        f"{len(train)} synthetic sky images with captions, next to a control trained on shuffled captions. "
        f"Validation: {len(val)} held-out images. Run time {seconds:.0f} s.")
    report.heading("Top-10% retrieval accuracy (validation)")
    report.table(summary)
    report.paragraph("Random expectation: 0.10. The control must stay near it; the trained model should "
                     "be far above it.", css_class="note")
    report.figure(plot_retrieval_curve({k: v for k, v in curves.items()}), "retrieval curves (image to text)")
    report.heading("Training curves")
    for name, res in runs.items():
        if len(res.history):
            report.figure(plot_history(res.history, title=name), name)
    report.heading("Text searches over validation and real telescope images")
    report.paragraph(f"The index in {out / 'index'} remembers its model; search it again with: "
                     f"{follow_up_command(out / 'index')}, or on a web page with: {serve_command(out / 'index')}",
                     css_class="note")
    for q, hits in searches.items():
        report.image_grid([(thumbs[int(r["row"])], f"{r['name']}  score {float(r['score']):.3f}") for r in hits],
                          title=f"query: {q}")
    if zs is not None:
        report.heading("Zero-shot classification of real telescope images")
        report.paragraph("The small demo model only knows the synthetic classes; real images are "
                         "ranked against those class descriptions.", css_class="note")
        zs_rows = [{"image": real[int(r["image"])][0], "rank": int(r["rank"]), "category": str(r["category"]),
                    "score": float(r["score"])} for r in zs]
        report.table(zs_rows)
        report.image_grid([(load_image(obj), name) for name, obj in real])
    if llava_result is not None:
        from .astrollava import report_section

        report_section(report, llava_result)
    else:
        report.heading("AstroLLaVA")
        report.paragraph(f"The AstroLLaVA part did not run: {llava_note}.", css_class="note")
    return report.write(out / "report.html")


def _write_results(out: Path, summary, llava_result, llava_note: str, seconds: float) -> Path:
    """``results.json``: the figures of the report for programs."""
    import json

    from ..utils.files import atomic_write_text

    def clip_row(row) -> dict:
        return {"model": str(row["model"]), "top10_image_to_text": float(row["top10_image_to_text"]),
                "top10_text_to_image": float(row["top10_text_to_image"]), "random": float(row["random"]),
                "n_val": int(row["n_val"])}

    rows = [clip_row(r) for r in summary]
    results = {"clip": rows[0], "control": rows[1],
               "llava": llava_result.scores if llava_result is not None else {"skipped": llava_note},
               "rerank": llava_result.rerank if llava_result is not None else {"skipped": llava_note},
               "seconds": round(seconds, 1)}
    if llava_result is not None:
        results["llava"] = {**results["llava"], "model_dir": str(llava_result.model_dir),
                            "seconds": round(llava_result.seconds, 1)}
    path = out / "results.json"
    atomic_write_text(path, json.dumps(results, indent=2, allow_nan=False, default=_json_number) + "\n")
    return path


def _json_number(value):
    import numpy as np

    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def run_demo(output_dir: str | os.PathLike = "astrovl-demo", *, steps: int | None = None, seed: int = 0,
             device=None, model: str | None = None, pretrained: str | None = None,
             n_images: int | None = None, image_size: int = 64, quick: bool = False,
             progress: bool = True, llava: bool = True) -> DemoResult:
    """Run both pipelines offline and write an HTML report and ``results.json``.

    1. generate a :class:`~astrovl.SyntheticSkyDataset` (train/val);
    2. train a small CLIP from scratch with :func:`~astrovl.training.train_clip`,
       and the shuffled-caption control;
    3. measure top-10% retrieval accuracy of both (random expectation 10%);
    4. index the validation images plus real telescope images shipped inside
       installed packages (``OUTPUT/index``, which records the trained model, so
       ``astrovl search OUTPUT/index "text"`` searches it again), run text searches
       and zero-shot classification;
    5. train a small AstroLLaVA on the training images in the two stages of the
       paper, its vision tower the CLIP image tower of step 2 (saved to
       ``OUTPUT/llava``), score its captions of the held-out images like the
       paper's Galaxy10 evaluation next to the untrained model, and re-rank the
       text searches with it (:mod:`astrovl.demo.astrollava`; needs the ``llava``
       extra, and the ``evaluation`` and ``offline-models`` extras for the scores);
    6. write ``report.html`` (image grids with scores, retrieval curves, the
       accuracy table, training curves, the AstroLLaVA section) and
       ``results.json`` beside it.

    Parameters
    ----------
    output_dir : path
        Where the dataset, runs and ``report.html`` go: a new or empty folder,
        or the folder of an earlier demo (a folder holding other files is
        refused with :class:`~astrovl.exceptions.OutputDirectoryError`).
    steps : int, optional
        Training steps per CLIP model (default 400; 60 with ``quick``).
    seed : int
    device : str, optional
    model, pretrained : str, optional
        Fine-tune this open_clip model (e.g. ``"ViT-B-16"``, ``"openai"``; needs
        the weights, i.e. a network or a local copy) instead of training the
        small model from scratch.
    n_images : int, optional
        Synthetic images (default 1,100; 330 with ``quick``).
    image_size : int
        Side of the synthetic images.
    quick : bool
        A reduced run for tests.
    progress : bool
    llava : bool
        Run the AstroLLaVA part (step 5); ``False`` gives the CLIP-only run.

    Returns
    -------
    DemoResult
    """
    from ..utils.files import DEMO_OUTPUT, prepare_output_dir

    if pretrained is not None and model is None:
        raise ValueError(f"pretrained={pretrained!r} needs model= (the open_clip model name it is a tag "
                         "of); without a model the demo trains a small CLIP from scratch")
    t0 = time.perf_counter()
    out = prepare_output_dir(output_dir, DEMO_OUTPUT)
    settings = _settings(steps, n_images, image_size, quick, model)
    base = _base_clip(model, pretrained, settings, device=device, seed=seed)
    ds = _make_data(out, settings, seed=seed, progress=progress)
    train, val = ds.split("train"), ds.split("val")
    runs = _train_clips(base, train, val, out, settings, device=device, seed=seed, progress=progress)
    summary, curves = _score_clips(runs, val)
    trained = runs[settings.mode].embedder
    shown = _search_index(out, trained, val, ds.class_prompts)
    llava_result, llava_note = _llava_part(out, ds, trained, llava=llava, quick=quick, seed=seed, device=device,
                                           progress=progress)
    seconds = time.perf_counter() - t0
    path = _write_report(out, settings=settings, trained=trained, runs=runs, summary=summary, curves=curves,
                         train=train, val=val, shown=shown, llava_result=llava_result, llava_note=llava_note,
                         seconds=seconds)
    results = _write_results(out, summary, llava_result, llava_note, seconds)
    return DemoResult(report_path=path, summary=summary, output_dir=out, searches=shown.searches,
                      zero_shot=shown.zero_shot,
                      seconds=time.perf_counter() - t0, index_path=out / "index",
                      search_command=follow_up_command(out / "index"),
                      serve_command=serve_command(out / "index"), results_path=results, llava=llava_result,
                      llava_note=llava_note)


def follow_up_command(index_dir: str | os.PathLike, query: str = "two merging galaxies") -> str:
    """The shell command that searches the demo's index again (the index loads its own model)."""
    import shlex

    return f"astrovl search {shlex.quote(str(index_dir))} {shlex.quote(query)}"


def serve_command(index_dir: str | os.PathLike) -> str:
    """The shell command that puts the demo's index on a web page (the index loads its own model)."""
    import shlex

    return f"astrovl serve {shlex.quote(str(index_dir))}"
