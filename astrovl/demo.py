"""The offline demonstration: the whole HubbleCLIP pipeline on a procedural sky.

:func:`run_demo` generates a labelled synthetic sky, trains a small CLIP from
scratch (and the shuffled-caption control), measures top-10% retrieval
accuracy, indexes the validation images together with real telescope images
shipped inside installed packages, runs text searches and zero-shot
classification, and writes a self-contained HTML report.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["run_demo", "DemoResult", "DEMO_QUERIES", "bundled_real_images", "follow_up_command",
           "serve_command"]

log = logging.getLogger(__name__)

DEMO_QUERIES = (
    "barred spiral galaxy with prominent arms",
    "dense globular star cluster",
    "gravitational lens arc around a massive galaxy",
    "edge-on disk galaxy",
    "glowing nebula with filaments",
    "two merging galaxies",
)


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

    from .utils.files import atomic_write

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
    from .config import conf

    return conf.set_temp("progress", False)


def run_demo(output_dir: str | os.PathLike = "astrovl-demo", *, steps: int | None = None, seed: int = 0,
             device=None, model: str | None = None, pretrained: str | None = None,
             n_images: int | None = None, image_size: int = 64, quick: bool = False,
             progress: bool = True) -> DemoResult:
    """Run the whole retrieval pipeline offline and write an HTML report.

    1. generate a :class:`~astrovl.SyntheticSkyDataset` (train/val);
    2. train a small CLIP from scratch with :func:`~astrovl.training.train_clip`,
       and the shuffled-caption control;
    3. measure top-10% retrieval accuracy of both (random expectation 10%);
    4. index the validation images plus real telescope images shipped inside
       installed packages (``OUTPUT/index``, which records the trained model, so
       ``astrovl search OUTPUT/index "text"`` searches it again), run text searches
       and zero-shot classification;
    5. write ``report.html`` (image grids with scores, retrieval curves, the
       accuracy table, training curves).

    Parameters
    ----------
    output_dir : path
        Where the dataset, runs and ``report.html`` go: a new or empty folder,
        or the folder of an earlier demo (a folder holding other files is
        refused with :class:`~astrovl.exceptions.OutputDirectoryError`).
    steps : int, optional
        Training steps per model (default 400; 60 with ``quick``).
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

    Returns
    -------
    DemoResult
    """
    from astropy.table import Table

    from .clip import TINY_CLIP_CONFIG, CLIPEmbedder, EmbeddingIndex
    from .datasets import SyntheticSkyDataset
    from .evaluation.retrieval import plot_retrieval_curve, retrieval_curve, top_k_percent_accuracy
    from .imaging import load_image
    from .reporting import HTMLReport
    from .training import CLIPTrainingConfig, train_clip
    from .training.common import plot_history
    from .utils.files import prepare_output_dir

    if pretrained is not None and model is None:
        raise ValueError(f"pretrained={pretrained!r} needs model= (the open_clip model name it is a tag "
                         "of); without a model the demo trains a small CLIP from scratch")
    t0 = time.perf_counter()
    out = prepare_output_dir(output_dir, "demo", recognize=lambda p: (p / "report.html").is_file())
    steps = steps or (60 if quick else 400)
    n_images = n_images or (330 if quick else 1100)

    log.info("generating %d synthetic sky images", n_images)
    if model is not None:
        base = CLIPEmbedder.from_pretrained(model, pretrained, device=device)
        image_size = max(image_size, base.image_size)
        mode, lr, warmup = "finetune", 1e-5, min(100, steps // 10)
    else:
        base = CLIPEmbedder.from_config(TINY_CLIP_CONFIG, device=device, seed=seed)
        mode, lr, warmup = "scratch", 1e-3, min(30, steps // 10)
    ds = SyntheticSkyDataset.generate(out / "data", n_images=n_images, image_size=image_size, seed=seed,
                                      val_fraction=0.2, progress=progress)
    train, val = ds.split("train"), ds.split("val")

    runs = {}
    for name, run_mode in ((f"{mode}", mode), ("shuffled captions (control)", "shuffled")):
        cfg = CLIPTrainingConfig(mode=run_mode, steps=steps, batch_size=32, lr=lr, warmup_steps=warmup,
                                 weight_decay=0.1 if model is None else 1e-3,
                                 eval_every=max(1, steps // 4), best_metric="val_top10",
                                 output_dir=str(out / "runs" / run_mode), device=device, seed=seed,
                                 progress=progress, tensorboard=False,
                                 overwrite=True)  # running the demo again replaces its runs
        runs[name] = train_clip(base, train, val, cfg)

    # accuracy table on the validation split
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
    summary = Table(rows=rows)
    trained = runs[mode].embedder

    # index: validation images + real telescope images (copied next to the data, so that the
    # index names files under the output directory, relative to it)
    real = _materialize_real_images(bundled_real_images(), out / "data" / "real")
    items = [str(p) for p in val.image_paths] + [str(p) for _, p in real]
    meta = Table({"name": [f"{r['id']} ({r['label']})" for r in val] + [n for n, _ in real],
                  "label": [str(r["label"]) for r in val] + ["real image"] * len(real),
                  "kind": ["synthetic"] * len(val) + ["real"] * len(real),
                  "path": [os.path.relpath(p, out) for p in items]})
    # the trained model was loaded from its run directory, so the index records where it is and
    # `astrovl search OUT/index "text"` works without naming the model
    index = EmbeddingIndex.build(trained, items, metadata=meta, progress=False, image_root=out / "data")
    index.save(out / "index")
    search_command = follow_up_command(out / "index")
    thumbs = {i: load_image(obj) for i, obj in enumerate(items)}
    searches = {q: index.search(q, k=6) for q in DEMO_QUERIES}

    prompts = ds.class_prompts
    zs = trained.zero_shot([obj for _, obj in real], categories=list(prompts.values()), top_k=3) if real else None

    # report
    report = HTMLReport("astrovl demo: image-text retrieval on a procedural sky")
    report.paragraph(
        f"A CLIP model ({trained.model_name}, {mode}) was trained for {steps} steps on {len(train)} synthetic "
        f"sky images with captions, next to a control trained on shuffled captions. Validation: {len(val)} "
        f"held-out images. Run time {time.perf_counter() - t0:.0f} s.")
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
                     f"{search_command}, or on a web page with: {serve_command(out / 'index')}",
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
    path = report.write(out / "report.html")
    return DemoResult(report_path=path, summary=summary, output_dir=out, searches=searches, zero_shot=zs,
                      seconds=time.perf_counter() - t0, index_path=out / "index",
                      search_command=search_command,
                      serve_command=serve_command(out / "index"))


def follow_up_command(index_dir: str | os.PathLike, query: str = "two merging galaxies") -> str:
    """The shell command that searches the demo's index again (the index loads its own model)."""
    import shlex

    return f"astrovl search {shlex.quote(str(index_dir))} {shlex.quote(query)}"


def serve_command(index_dir: str | os.PathLike) -> str:
    """The shell command that puts the demo's index on a web page (the index loads its own model)."""
    import shlex

    return f"astrovl serve {shlex.quote(str(index_dir))}"
