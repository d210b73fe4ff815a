"""A procedural, labelled sky for offline training, demonstrations and tests.

Each image is rendered from a physical model of one object class, convolved
with a Gaussian PSF, given a sky background with Poisson and read noise, and
written as a FITS file with a celestial (TAN) WCS. Captions follow the
"objects; use cases" style of the Hubble summaries, with varied wording.

Classes (``label``):

=========================  ==============================================================
``elliptical``             smooth round or elliptical galaxy (Sersic n = 3-5)
``cigar``                  smooth, highly elongated galaxy
``edge_on_bulge``          edge-on exponential disk with a de Vaucouleurs bulge
``edge_on_disk``           edge-on exponential disk without a bulge
``spiral``                 face-on disk with logarithmic spiral arms
``barred_spiral``          spiral with a central bar (flat Sersic, n = 0.5)
``merger``                 two galaxies in contact with a tidal tail
``globular_cluster``       thousands of stars drawn from a Plummer profile
``open_cluster``           tens of bright stars scattered over the field
``nebula``                 diffuse emission with filaments (power-law random field)
``lens``                   a lens galaxy with arcs: a background Sersic source behind a
                           singular isothermal sphere (ray-traced)
=========================  ==============================================================
"""

from __future__ import annotations

import functools
import math
import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from astropy.io import fits
from astropy.modeling.models import Sersic2D
from astropy.table import Table
from astropy.wcs import WCS

from ..exceptions import DatasetError
from ..utils.files import SYNTHETIC_DATASET_OUTPUT, atomic_write, prepare_output_dir
from ..utils.progress import progress_bar
from .records import ManifestDataset, write_manifest

__all__ = ["SyntheticSkyDataset", "SYNTHETIC_CLASSES", "SYNTHETIC_FAMILIES", "render_object"]

# label -> (object phrases, use-case phrases); the first object phrase is the class prompt
SYNTHETIC_CLASSES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "elliptical": (
        ("elliptical galaxy", "smooth early-type galaxy", "round elliptical galaxy",
         "massive quiescent elliptical"),
        ("measure the surface brightness profile", "study old stellar populations",
         "fit a de Vaucouleurs profile", "estimate the galaxy stellar mass"),
    ),
    "cigar": (
        ("cigar-shaped galaxy", "highly elongated smooth galaxy", "cigar shaped elliptical",
         "flattened smooth galaxy"),
        ("measure the axis ratio", "constrain intrinsic galaxy shapes",
         "study elongated early-type galaxies"),
    ),
    "edge_on_bulge": (
        ("edge-on disk galaxy with a bulge", "edge-on spiral with a central bulge",
         "bulge and thin disk seen edge-on"),
        ("measure the bulge-to-disk ratio", "study vertical disk structure",
         "map the bulge light profile"),
    ),
    "edge_on_disk": (
        ("edge-on disk galaxy without a bulge", "bulgeless edge-on thin disk",
         "pure disk galaxy seen edge-on"),
        ("measure the disk scale height", "study bulgeless disk formation",
         "constrain thin disk structure"),
    ),
    "spiral": (
        ("spiral galaxy", "face-on spiral galaxy with arms", "grand design spiral",
         "disk galaxy with spiral arms"),
        ("trace star formation along spiral arms", "measure the arm pitch angle",
         "study disk galaxy dynamics"),
    ),
    "barred_spiral": (
        ("barred spiral galaxy", "spiral galaxy with a central bar", "barred disk galaxy",
         "stellar bar with spiral arms"),
        ("study bar-driven secular evolution", "measure the bar length",
         "investigate gas inflow along the bar"),
    ),
    "merger": (
        ("merging galaxies", "interacting galaxy pair", "galaxy merger with a tidal tail",
         "colliding galaxies"),
        ("study merger-driven galaxy evolution", "measure tidal tail morphology",
         "investigate interaction-triggered star formation"),
    ),
    "globular_cluster": (
        ("globular cluster", "dense globular star cluster", "old globular cluster of stars",
         "resolved globular cluster"),
        ("measure the cluster density profile", "study old stellar populations in clusters",
         "construct a color-magnitude diagram"),
    ),
    "open_cluster": (
        ("open star cluster", "sparse open cluster", "young open cluster of bright stars",
         "loose stellar association"),
        ("measure cluster membership", "study young stellar populations",
         "determine the cluster age"),
    ),
    "nebula": (
        ("emission nebula", "diffuse nebula with filaments", "glowing gas cloud",
         "filamentary nebula"),
        ("map ionized gas structure", "study the interstellar medium",
         "trace star-forming regions"),
    ),
    "lens": (
        ("gravitational lens arc", "strong gravitational lens", "lensed arc around a galaxy",
         "Einstein ring"),
        ("measure the lens mass", "constrain dark matter in the lens galaxy",
         "study magnified background galaxies"),
    ),
}

#: The kind of object of each class, for the synthetic conversations.
SYNTHETIC_FAMILIES = {
    "elliptical": "a galaxy", "cigar": "a galaxy", "edge_on_bulge": "a galaxy", "edge_on_disk": "a galaxy",
    "spiral": "a galaxy", "barred_spiral": "a galaxy", "merger": "a pair of galaxies",
    "globular_cluster": "a star cluster", "open_cluster": "a star cluster", "nebula": "a cloud of gas",
    "lens": "a gravitational lens",
}

_OBJECT_QUESTIONS = ("What kind of object is shown in this image?", "What is in this image?",
                     "What does this image show?")
_USE_QUESTIONS = ("What could astronomers learn from this image?", "What is this image useful for?")
_FAMILY_QUESTIONS = ("Is this a galaxy, a star cluster or a cloud of gas?", "What type of object is this?")

PIXEL_SCALE_ARCSEC = 0.05
_SKY = 20.0
_READ_NOISE = 4.0


def _sersic(x, y, amp, r_eff, n, x0, y0, ellip, theta):
    return Sersic2D.evaluate(x, y, amp, r_eff, n, x0, y0, ellip, theta)


def _spiral_disk(x, y, x0, y0, scale, theta0, pitch, n_arms, amp, rng):
    dx, dy = x - x0, y - y0
    r = np.hypot(dx, dy) + 1e-3
    phi = np.arctan2(dy, dx)
    arm = np.cos(n_arms * (phi - theta0 - np.log(r) / np.tan(pitch)))
    disk = np.exp(-r / scale)
    return amp * disk * (0.35 + 0.65 * np.clip(arm, 0, None) ** 2)


def _point_sources(size, xs, ys, fluxes):
    img = np.zeros((size, size), dtype=np.float64)
    ix, iy = np.round(xs).astype(int), np.round(ys).astype(int)
    ok = (ix >= 0) & (ix < size) & (iy >= 0) & (iy < size)
    np.add.at(img, (iy[ok], ix[ok]), fluxes[ok])
    return img


def _random_field(size, rng, slope=3.2):
    ky = np.fft.fftfreq(size)[:, None]
    kx = np.fft.rfftfreq(size)[None, :]
    k = np.hypot(kx, ky)
    k[0, 0] = 1.0
    amp = k ** (-slope / 2.0)
    amp[0, 0] = 0.0
    phases = rng.normal(size=amp.shape) + 1j * rng.normal(size=amp.shape)
    field = np.fft.irfft2(amp * phases, s=(size, size))
    return (field - field.mean()) / (field.std() + 1e-12)


def render_object(label: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """Render the noiseless, unconvolved surface brightness of one object of class ``label``."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float64)
    c = size / 2.0 - 0.5
    x0, y0 = c + rng.uniform(-0.06, 0.06) * size, c + rng.uniform(-0.06, 0.06) * size
    s = size / 64.0  # scale factor relative to a 64-pixel image
    theta = rng.uniform(0, np.pi)
    if label == "elliptical":
        return _sersic(x, y, 1.0, rng.uniform(4, 7) * s, rng.uniform(3, 5), x0, y0,
                       rng.uniform(0.0, 0.3), theta)
    if label == "cigar":
        return _sersic(x, y, 1.0, rng.uniform(7, 10) * s, rng.uniform(1.5, 3), x0, y0,
                       rng.uniform(0.72, 0.85), theta)
    if label in ("edge_on_bulge", "edge_on_disk"):
        dx, dy = x - x0, y - y0
        u = dx * np.cos(theta) + dy * np.sin(theta)
        v = -dx * np.sin(theta) + dy * np.cos(theta)
        disk = np.exp(-np.abs(u) / (rng.uniform(7, 10) * s)) / np.cosh(v / (rng.uniform(0.8, 1.3) * s)) ** 2
        img = disk
        if label == "edge_on_bulge":
            img = img + _sersic(x, y, rng.uniform(0.25, 0.45), rng.uniform(3.0, 4.0) * s, 2.5, x0, y0, 0.25, theta)
        return img
    if label == "spiral":
        disk = _spiral_disk(x, y, x0, y0, rng.uniform(7, 10) * s, theta, np.radians(rng.uniform(15, 30)),
                            2, 1.0, rng)
        return disk + _sersic(x, y, 1.5, 1.5 * s, 1.5, x0, y0, 0.1, theta)
    if label == "barred_spiral":
        bar_len = rng.uniform(5, 8) * s
        disk = _spiral_disk(x, y, x0, y0, rng.uniform(8, 11) * s, theta, np.radians(rng.uniform(15, 25)),
                            2, 0.8, rng)
        bar = _sersic(x, y, 2.0, bar_len, 0.5, x0, y0, 0.8, theta)
        return disk + bar + _sersic(x, y, 1.0, 1.2 * s, 1.5, x0, y0, 0.1, theta)
    if label == "merger":
        sep = rng.uniform(6, 10) * s
        ang = rng.uniform(0, 2 * np.pi)
        x1, y1 = x0 - 0.5 * sep * np.cos(ang), y0 - 0.5 * sep * np.sin(ang)
        x2, y2 = x0 + 0.5 * sep * np.cos(ang), y0 + 0.5 * sep * np.sin(ang)
        g = _sersic(x, y, 1.0, rng.uniform(3, 5) * s, 2.5, x1, y1, 0.2, theta)
        g += _sersic(x, y, rng.uniform(0.6, 1.0), rng.uniform(3, 5) * s, 2.0, x2, y2, 0.3, theta + 1)
        t = np.linspace(0, 1, 120)
        curve = ang + np.pi / 2 + rng.choice([-1, 1]) * 2.2 * t
        tx = x2 + (t * 22 * s) * np.cos(curve)
        ty = y2 + (t * 22 * s) * np.sin(curve)
        tail = _point_sources(size, tx, ty, np.full(t.size, 0.35 * s))
        from scipy.ndimage import gaussian_filter

        return g + gaussian_filter(tail, 1.6 * s)
    if label == "globular_cluster":
        n = int(rng.integers(1200, 2500))
        a = rng.uniform(2.5, 4.0) * s
        # Plummer radii by inverse transform sampling of the cumulative mass
        m = rng.uniform(0.001, 0.98, n)
        r = a / np.sqrt(m ** (-2.0 / 3.0) - 1.0)
        phi = rng.uniform(0, 2 * np.pi, n)
        flux = rng.pareto(2.3, n) * 0.15 + 0.05
        return _point_sources(size, x0 + r * np.cos(phi), y0 + r * np.sin(phi), flux) * 3.0
    if label == "open_cluster":
        n = int(rng.integers(25, 60))
        xs = x0 + rng.normal(0, 0.22 * size, n)
        ys = y0 + rng.normal(0, 0.22 * size, n)
        return _point_sources(size, xs, ys, rng.uniform(1.0, 6.0, n) * 4.0)
    if label == "nebula":
        f = _random_field(size, rng)
        fil = np.abs(_random_field(size, rng, slope=2.6))
        filaments = np.exp(-fil * 4.0)
        env = np.exp(-((x - x0) ** 2 + (y - y0) ** 2) / (2 * (0.3 * size) ** 2))
        return env * (np.exp(0.8 * f) * 0.5 + 1.5 * filaments)
    if label == "lens":
        theta_e = rng.uniform(7, 11) * s
        dx, dy = x - x0, y - y0
        r = np.hypot(dx, dy) + 1e-6
        bx, by = dx - theta_e * dx / r, dy - theta_e * dy / r  # SIS lens equation
        off = rng.uniform(0.5, 2.5) * s
        phi = rng.uniform(0, 2 * np.pi)
        src = _sersic(bx, by, 2.0, rng.uniform(1.2, 2.0) * s, 1.0, off * np.cos(phi), off * np.sin(phi),
                      0.3, theta)
        lens_gal = _sersic(x, y, 1.2, rng.uniform(2.5, 3.5) * s, 4.0, x0, y0, 0.2, theta)
        return src + lens_gal
    raise DatasetError(f"unknown synthetic class {label!r}; known: {sorted(SYNTHETIC_CLASSES)}")


def _gaussian_taps(sigma: float) -> np.ndarray:
    """The 1-D factor of astropy's ``Gaussian2DKernel(sigma)``: sampled at pixel centres,
    ``8 sigma`` rounded up to an odd number of taps, normalised to a sum of 1."""
    n = int(math.ceil(8 * sigma))
    n += n % 2 == 0
    half = (n - 1) // 2
    x = np.arange(-half, half + 1, dtype=np.float64)
    taps = np.exp(-0.5 * (x / sigma) ** 2)
    return taps / taps.sum()


def _convolve_psf(truth: np.ndarray, sigma: float) -> np.ndarray:
    """Periodic convolution with a Gaussian PSF of ``sigma`` pixels.

    The same as ``convolve_fft(truth, Gaussian2DKernel(sigma), boundary="wrap")``
    (an isotropic Gaussian sampled on a square is the product of two 1-D ones),
    done as two 1-D convolutions: a few times faster at these sizes.
    """
    from scipy import ndimage

    taps = _gaussian_taps(sigma)
    out = ndimage.convolve1d(truth, taps, axis=0, mode="wrap")
    return ndimage.convolve1d(out, taps, axis=1, mode="wrap")


def _observe(truth: np.ndarray, rng: np.random.Generator, size: int) -> np.ndarray:
    img = _convolve_psf(truth, rng.uniform(0.8, 1.4) * size / 64.0)
    img = np.clip(img, 0, None)
    peak = np.percentile(img, 99.7) + 1e-12
    counts = img / peak * rng.uniform(300, 1200)
    observed = rng.poisson(counts + _SKY).astype(np.float32) - _SKY
    observed += rng.normal(0, _READ_NOISE, observed.shape).astype(np.float32)
    return observed


@functools.lru_cache(maxsize=8)
def _header_template(size: int) -> fits.Header:
    """The WCS header of an image of ``size`` pixels (CRVAL and LATPOLE set per image)."""
    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    w.wcs.crpix = [size / 2 + 0.5, size / 2 + 0.5]
    w.wcs.crval = [0.0, 0.0]
    scale = PIXEL_SCALE_ARCSEC / 3600.0
    w.wcs.cdelt = [-scale, scale]
    w.wcs.cunit = ["deg", "deg"]
    return w.to_header()


def _sky_position(rng: np.random.Generator) -> tuple[float, float]:
    """A random pointing ``(ra, dec)`` in degrees, uniform on the sphere up to |dec| of 72 deg.

    Rounded to the 14 significant digits that ``WCS.to_header`` (wcslib) writes.
    """
    ra = float(rng.uniform(0, 360))
    dec = float(np.degrees(np.arcsin(rng.uniform(-0.95, 0.95))))
    return float(f"{ra:.14G}"), float(f"{dec:.14G}")


@functools.lru_cache(maxsize=4)
def _image_hdu(size: int) -> fits.PrimaryHDU:
    """One reusable HDU per image size (per process): header cards set, then data, then written.

    Reusing it saves building and verifying a header per image; the files are
    byte for byte what ``PrimaryHDU(data, header=header).writeto`` gives.
    """
    header = _header_template(size).copy()
    header["OBJECT"] = ("", "synthetic object class")
    header["BUNIT"] = "count"
    header["ORIGIN"] = "astrovl synthetic sky"
    return fits.PrimaryHDU(np.zeros((size, size), dtype=np.float32), header=header)


def _caption(label: str, rng: np.random.Generator) -> tuple[str, str, str]:
    objects, uses = SYNTHETIC_CLASSES[label]
    obj = [objects[int(rng.integers(len(objects)))]]
    use = list(rng.choice(uses, size=int(rng.integers(1, 3)), replace=False))
    objs = ", ".join(obj)
    uses_s = ", ".join(use)
    return f"{objs}; {uses_s}", objs, uses_s


def _make_image(root: str, i: int, label: str, seed: int, image_size: int) -> tuple:
    """Render and write image ``i`` unless a complete one exists.

    Everything random comes from ``default_rng([seed, 1, i])`` in a fixed order
    (caption, position, object, PSF and noise), so images do not depend on which
    process renders them or in which order. Returns ``(written, (image,
    caption, objects, use_cases))``, the latter the manifest fields.
    """
    rng = np.random.default_rng([seed, 1, i])
    rel = f"images/sky_{i:06d}.fits"
    path = Path(root) / rel
    caption, objs, uses = _caption(label, rng)
    ra, dec = _sky_position(rng)
    hdu = _image_hdu(image_size)
    expected = len(hdu.header.tostring()) + -(-image_size * image_size * 4 // 2880) * 2880
    complete = path.is_file() and path.stat().st_size == expected
    if not complete:
        data = _observe(render_object(label, image_size, rng), rng, image_size)
        hdu.header["CRVAL1"] = ra
        hdu.header["CRVAL2"] = dec
        hdu.header["LATPOLE"] = dec
        hdu.header["OBJECT"] = label
        hdu.data = data
        with atomic_write(path, "wb", fsync=False) as fh:
            # a WCS template and three valid cards: nothing to verify or fix
            hdu.writeto(fh, output_verify="ignore")
    return not complete, (rel, caption, objs, uses)


def _make_images(root: str, tasks: list[tuple[int, str]], seed: int, image_size: int) -> list[tuple]:
    return [_make_image(root, i, label, seed, image_size) for i, label in tasks]


class SyntheticSkyDataset(ManifestDataset):
    """A labelled procedural sky (see the module documentation for the classes).

    Open an existing dataset with ``SyntheticSkyDataset(directory)``; make one with
    :meth:`generate`.
    """

    @property
    def class_prompts(self) -> dict[str, str]:
        """Class label -> short description, for zero-shot classification."""
        return {label: SYNTHETIC_CLASSES[label][0][0] for label in (self.labels or [])
                if label in SYNTHETIC_CLASSES}

    def conversation_records(self, seed: int = 0) -> list[dict]:
        """Synthetic conversations about every image, as LLaVA conversation records.

        Two or three question-answer turns per image, written from its label and
        caption fields alone (objects and use cases), the way AstroLLaVA's
        conversations are written from the caption alone: what the object is,
        what kind of object it is, and what it is useful for. The records
        (``{"id", "image", "split", "conversations": [{"from": "human", "value":
        "<image>\\n..."}, {"from": "gpt", "value": ...}, ...]}``, image paths
        relative to the dataset folder) train stage 2 of
        :func:`~astrovl.training.train_llava`.

        Parameters
        ----------
        seed : int
            Seed of the choice of questions.
        """
        rng = np.random.default_rng([seed, 2])
        m = self.manifest
        records = []
        for i in range(len(self)):
            label = str(m["label"][i])
            objects, uses = str(m["objects"][i]), str(m["use_cases"][i])
            turns = [(str(rng.choice(_OBJECT_QUESTIONS)), f"{objects[:1].upper()}{objects[1:]}."),
                     (str(rng.choice(_FAMILY_QUESTIONS)), f"It is {SYNTHETIC_FAMILIES.get(label, 'an object')}."),
                     (str(rng.choice(_USE_QUESTIONS)), f"Astronomers could {uses}.")]
            if rng.random() < 0.5:
                del turns[1]
            conv = []
            for k, (q, a) in enumerate(turns):
                conv += [{"from": "human", "value": ("<image>\n" if k == 0 else "") + q}, {"from": "gpt", "value": a}]
            records.append({"id": str(m["id"][i]), "image": str(m["image"][i]), "split": str(m["split"][i]),
                            "conversations": conv})
        return records

    @classmethod
    def generate(cls, directory: str | os.PathLike, n_images: int = 5000, image_size: int = 128,
                 seed: int = 0, val_fraction: float = 0.1, classes: list[str] | None = None,
                 progress: bool = True, workers: int = 0) -> SyntheticSkyDataset:
        """Render a dataset to ``directory`` (FITS images + ``manifest.ecsv``).

        Generation is deterministic for a given ``seed`` and resumable: images that
        already exist complete (the right size) are kept, so an interrupted run can
        simply be repeated. The images do not depend on ``workers``.

        Parameters
        ----------
        directory : path
            A new or empty folder, or a synthetic dataset written earlier (which
            is resumed); a folder holding other files is refused
            (:class:`~astrovl.exceptions.OutputDirectoryError`).
        n_images : int
        image_size : int
            Side in pixels (at least 32).
        seed : int
        val_fraction : float
            Fraction of images in the ``val`` split (classes stay balanced).
        classes : list of str, optional
            Subset of :data:`SYNTHETIC_CLASSES` (default: all).
        progress : bool
        workers : int
            Worker processes that render and write images
            (:class:`~concurrent.futures.ProcessPoolExecutor`); 0 or 1 (the
            default) renders in this process, which is fast enough for the
            default data set (5,000 images of 128 pixels in about 20 s on one
            core). Where processes are spawned (Windows, macOS), call this from
            under ``if __name__ == "__main__":`` in scripts.
        """
        labels = list(SYNTHETIC_CLASSES) if classes is None else list(classes)
        unknown = [c for c in labels if c not in SYNTHETIC_CLASSES]
        if unknown:
            raise DatasetError(f"unknown classes {unknown}; choose from {sorted(SYNTHETIC_CLASSES)}")
        if n_images < len(labels):
            raise DatasetError(f"n_images={n_images} is smaller than the number of classes ({len(labels)})")
        if image_size < 32:
            raise DatasetError(f"image_size={image_size} is too small; use at least 32 pixels")
        if not 0 <= val_fraction < 1:
            raise DatasetError(f"val_fraction={val_fraction} must be in [0, 1)")
        root = prepare_output_dir(directory, SYNTHETIC_DATASET_OUTPUT)
        (root / "images").mkdir(parents=True, exist_ok=True)
        plan = np.random.default_rng([seed, 0])
        assignment = np.array([labels[i % len(labels)] for i in range(n_images)])
        plan.shuffle(assignment)
        is_val = np.zeros(n_images, dtype=bool)
        for label in labels:
            idx = np.flatnonzero(assignment == label)
            n_val = int(round(val_fraction * len(idx)))
            is_val[idx[:n_val]] = True
        tasks = [(i, str(assignment[i])) for i in range(n_images)]
        chunk = 50
        chunks = [tasks[k:k + chunk] for k in range(0, n_images, chunk)]
        made: list[tuple] = []
        bar = progress_bar(total=n_images, enabled=progress, desc="rendering synthetic sky", unit="img")
        if workers and workers > 1 and len(chunks) > 1:
            with ProcessPoolExecutor(max_workers=min(int(workers), len(chunks))) as pool:
                futures = [pool.submit(_make_images, str(root), c, seed, image_size) for c in chunks]
                for future, c in zip(futures, chunks):
                    made.extend(future.result())
                    bar.update(len(c))
        else:
            for c in chunks:
                made.extend(_make_images(str(root), c, seed, image_size))
                bar.update(len(c))
        bar.close()
        if any(written for written, _ in made) and hasattr(os, "sync"):
            os.sync()  # the images were written without a flush each: one for all of them
        rows = []
        for (i, label), (_, (rel, caption, objs, uses)) in zip(tasks, made):
            rows.append((f"sky_{i:06d}", "val" if is_val[i] else "train", rel, caption, label, objs,
                         uses, "synthetic"))
        table = Table(rows=rows, names=("id", "split", "image", "caption", "label", "objects",
                                        "use_cases", "source"))
        table.meta.update(seed=seed, image_size=image_size, n_images=n_images)
        write_manifest(table, root, kind="synthetic")
        return cls(root)
