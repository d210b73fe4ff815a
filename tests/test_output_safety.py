"""Writing never destroys what astrovl did not write.

Every writer of a folder (index, models, conversions, checkpoints, training runs,
dataset builders, the demo, the image cache, the napari "save index to" and every
command-line ``--output``/``--index``) replaces or fills a folder only when it is
missing, empty, or an earlier astrovl output of the same kind. A folder holding a
user's files is refused with an error naming the folder, and every file in it is
still there afterwards, byte for byte.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from astropy.table import Table

from astrovl.cli import main
from astrovl.clip import TINY_CLIP_CONFIG, CLIPEmbedder, EmbeddingIndex
from astrovl.exceptions import OutputDirectoryError
from astrovl.utils import files as files_mod
from astrovl.utils.files import (
    OUTPUT_MARKER,
    atomic_directory,
    check_output_dir,
    prepare_output_dir,
    read_output_marker,
)

USER_FILES = {"notes.txt": b"my observing notes\n", "photos/m31.jpg": bytes(range(256)) * 4,
              ".hidden": b"dot file"}


def make_user_folder(path: Path) -> Path:
    """A folder holding a user's files (one in a subfolder)."""
    for rel, data in USER_FILES.items():
        (path / rel).parent.mkdir(parents=True, exist_ok=True)
        (path / rel).write_bytes(data)
    return path


def snapshot(path: Path) -> dict[str, bytes]:
    """Every file under ``path`` with its bytes."""
    return {p.relative_to(path).as_posix(): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def assert_untouched(path: Path, before: dict[str, bytes] | None = None) -> None:
    """The user's files are all there byte for byte, and nothing was added (no marker)."""
    expected = before if before is not None else USER_FILES
    assert snapshot(path) == expected
    assert not (path / OUTPUT_MARKER).exists()
    leftovers = [p.name for p in path.parent.iterdir() if p.name.endswith((".part", ".old"))]
    assert leftovers == []


@pytest.fixture
def user_dir(tmp_path) -> Path:
    return make_user_folder(tmp_path / "my_folder")


@pytest.fixture(scope="module")
def embedder():
    return CLIPEmbedder.from_config(TINY_CLIP_CONFIG, device="cpu", seed=0)


def small_index(n: int = 5, seed: int = 0) -> EmbeddingIndex:
    rng = np.random.default_rng(seed)
    index = EmbeddingIndex(8, model_id="test-model")
    index.add(rng.normal(size=(n, 8)), Table({"path": [f"img{i}.png" for i in range(n)]}))
    return index


# ---------------------------------------------------------------------------- the rule itself
def test_check_output_dir_states(tmp_path):
    assert check_output_dir(tmp_path / "missing", "index") is False
    (tmp_path / "empty").mkdir()
    assert check_output_dir(tmp_path / "empty", "index") is True
    marked = prepare_output_dir(tmp_path / "marked", "index")
    (marked / "vectors.safetensors").write_bytes(b"x")
    assert read_output_marker(marked)["kind"] == "index"
    assert check_output_dir(marked, "index") is True
    with pytest.raises(OutputDirectoryError, match="another kind") as err:
        check_output_dir(marked, "clip-model")
    assert str(marked) in str(err.value) and str(marked / "clip-model") in str(err.value)
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(OutputDirectoryError, match="is a file"):
        check_output_dir(tmp_path / "a_file", "index")
    # an earlier output without marker is recognised only by the caller's rule
    legacy = make_user_folder(tmp_path / "legacy")
    assert check_output_dir(legacy, "index", recognize=lambda p: (p / "notes.txt").is_file()) is True


def test_one_rule_says_which_folder_is_an_output_of_a_kind(tmp_path):
    """``is_output_of``: the marker, or for folders written before markers, the files their writers wrote."""
    from astrovl.clip import embedder, index_files
    from astrovl.datasets import hubble, outreach
    from astrovl.datasets._builder import REPORT_NAME
    from astrovl.llava.convert import CONVERSION_RECORD
    from astrovl.training import clip as train_clip_mod
    from astrovl.training import llava as train_llava_mod
    from astrovl.training.common import CHECKPOINT_DIR

    def folder(name, files):
        d = tmp_path / name
        for rel, text in files.items():
            (d / rel).parent.mkdir(parents=True, exist_ok=True)
            (d / rel).write_text(text)
        return d

    earlier = {
        index_files.OUTPUT_KIND: {index_files.MANIFEST: json.dumps({"format": index_files.FORMAT})},
        embedder.OUTPUT_KIND: {embedder.CONFIG_NAME: json.dumps({"format": embedder.FORMAT})},
        files_mod.LLAVA_MODEL_OUTPUT: {CONVERSION_RECORD: "{}"},
        train_clip_mod.OUTPUT_KIND: {f"{CHECKPOINT_DIR}/state.json": "{}"},
        train_llava_mod.OUTPUT_KIND: {f"{CHECKPOINT_DIR}/state.json": "{}"},
        hubble.OUTPUT_KIND: {REPORT_NAME: "{}"},
        outreach.OUTPUT_KIND: {REPORT_NAME: "{}"},
        files_mod.SYNTHETIC_DATASET_OUTPUT: {"images/sky_000000.fits": ""},
        files_mod.CHECKPOINT_OUTPUT: {"state.json": "{}"},
        files_mod.IMAGE_CACHE_OUTPUT: {"cache.json": "{}"},
        files_mod.THUMBNAIL_CACHE_OUTPUT: {"0a/1b.png": ""},
        files_mod.DEMO_OUTPUT: {"report.html": ""},
    }
    assert set(earlier) == {getattr(files_mod, name) for name in files_mod.__all__ if name.endswith("_OUTPUT")}
    for i, (kind, written) in enumerate(earlier.items()):
        d = folder(f"earlier-{i}", written)
        assert files_mod.is_output_of(d, kind), kind
        assert check_output_dir(d, kind) is True  # the writers accept it by default
        assert not files_mod.is_output_of(d, "demo" if kind != "demo" else "index")
    # the other signs of earlier outputs
    assert files_mod.is_output_of(folder("run", {"config.json": "{}", "metrics.csv": ""}), "clip-training")
    assert not files_mod.is_output_of(tmp_path / "run", "llava-training")
    assert files_mod.is_output_of(folder("hubble", {"products.ecsv": ""}), "hubble-dataset")
    assert not files_mod.is_output_of(tmp_path / "hubble", "outreach-dataset")
    assert not files_mod.is_output_of(folder("other-index", {"index.json": '{"format": "other"}'}), "index")
    assert not files_mod.is_output_of(folder("broken", {"astrovl_clip.json": "[1"}), "clip-model")
    # a marker decides, whatever the files
    marked = prepare_output_dir(tmp_path / "marked", "index")
    assert files_mod.is_output_of(marked, "index") and not files_mod.is_output_of(marked, "clip-model")
    assert not files_mod.is_output_of(tmp_path / "missing", "index")
    with pytest.raises(OutputDirectoryError):
        check_output_dir(folder("user", {"notes.txt": "mine"}), "index")


def test_refusal_names_the_folder_and_a_new_subfolder(user_dir):
    with pytest.raises(OutputDirectoryError) as err:
        check_output_dir(user_dir, "index")
    msg = str(err.value)
    assert str(user_dir) in msg and str(user_dir / "index") in msg and "'.hidden'" in msg
    assert isinstance(err.value, FileExistsError)  # except FileExistsError / OSError still works
    assert_untouched(user_dir)


def test_atomic_directory_refuses_a_user_folder(user_dir):
    ran = []
    with pytest.raises(OutputDirectoryError):
        with atomic_directory(user_dir, kind="index") as tmp:
            ran.append(tmp)
    assert ran == []  # refused before any work
    assert_untouched(user_dir)


def test_atomic_directory_checks_again_before_the_swap(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    with pytest.raises(OutputDirectoryError):
        with atomic_directory(target, kind="index") as tmp:
            (tmp / "a").write_text("new")
            (target / "late.txt").write_text("written by the user meanwhile")
    assert snapshot(target) == {"late.txt": b"written by the user meanwhile"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_atomic_directory_replaces_an_output_of_the_same_kind(tmp_path):
    target = tmp_path / "out"
    with atomic_directory(target, kind="thing") as tmp:
        (tmp / "old.txt").write_text("old")
    with atomic_directory(target, kind="thing") as tmp:
        (tmp / "new.txt").write_text("new")
    assert sorted(p.name for p in target.iterdir()) == sorted([OUTPUT_MARKER, "new.txt"])
    assert read_output_marker(target)["kind"] == "thing"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_crash_inside_the_write_keeps_the_previous_output(tmp_path):
    target = tmp_path / "out"
    with atomic_directory(target, kind="thing") as tmp:
        (tmp / "data.txt").write_text("version 1")
    before = snapshot(target)
    with pytest.raises(RuntimeError, match="power cut"):
        with atomic_directory(target, kind="thing") as tmp:
            (tmp / "data.txt").write_text("version 2, half")
            raise RuntimeError("power cut")
    assert snapshot(target) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_crash_during_the_swap_puts_the_previous_output_back(tmp_path, monkeypatch):
    target = tmp_path / "out"
    with atomic_directory(target, kind="thing") as tmp:
        (tmp / "data.txt").write_text("version 1")
    before = snapshot(target)
    real_replace = os.replace
    calls = []

    def failing_replace(src, dst):
        calls.append((Path(src).name, Path(dst).name))
        if Path(dst).name == "out" and Path(src).name.endswith(".part"):  # the new folder moving into place
            raise OSError("disk full")
        return real_replace(src, dst)

    monkeypatch.setattr(files_mod.os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk full"):
        with atomic_directory(target, kind="thing") as tmp:
            (tmp / "data.txt").write_text("version 2")
    monkeypatch.undo()
    assert calls[-1][0].endswith(".old") and calls[-1][1] == "out"  # the previous output moved back
    assert snapshot(target) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_prepare_output_dir_marks_first_and_allows_resume(tmp_path, user_dir):
    run = prepare_output_dir(tmp_path / "run", "clip-training")
    assert [p.name for p in run.iterdir()] == [OUTPUT_MARKER]
    (run / "checkpoint").mkdir()
    assert prepare_output_dir(run, "clip-training") == run  # resume into its own folder
    with pytest.raises(OutputDirectoryError):
        prepare_output_dir(run, "llava-training")
    with pytest.raises(OutputDirectoryError):
        prepare_output_dir(user_dir, "clip-training")
    assert_untouched(user_dir)
    # an empty folder is fine, and a marker left half written does not count as content
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / f".{OUTPUT_MARKER}.abc.part").write_text("")
    assert prepare_output_dir(empty, "synthetic-dataset") == empty


# ---------------------------------------------------------------------------- index
def test_index_save_refuses_a_user_folder(user_dir):
    with pytest.raises(OutputDirectoryError, match="not empty"):
        small_index().save(user_dir)
    assert_untouched(user_dir)


def test_index_save_into_the_image_folder_keeps_the_images(tmp_path, m13_path):
    """The user-reported case: ``--index`` pointing at the folder of previews."""
    previews = tmp_path / "previews"
    previews.mkdir()
    (previews / "m13.fits").write_bytes(Path(m13_path).read_bytes())
    before = snapshot(previews)
    with pytest.raises(OutputDirectoryError):
        small_index().save(previews)
    assert snapshot(previews) == before


def test_index_save_replaces_an_earlier_index(tmp_path):
    first = small_index(5, seed=0)
    first.save(tmp_path / "idx")
    second = small_index(7, seed=1)
    second.save(tmp_path / "idx")
    loaded = EmbeddingIndex.load(tmp_path / "idx")
    assert len(loaded) == 7
    np.testing.assert_allclose(np.asarray(loaded.vectors), np.asarray(second.vectors))
    assert read_output_marker(tmp_path / "idx")["kind"] == "index"


def test_index_saved_before_markers_is_replaced(tmp_path):
    small_index(5).save(tmp_path / "idx")
    (tmp_path / "idx" / OUTPUT_MARKER).unlink()  # as written by an earlier astrovl
    small_index(3).save(tmp_path / "idx")
    assert len(EmbeddingIndex.load(tmp_path / "idx")) == 3


@pytest.mark.parametrize("where", ["vectors", "marker"])
def test_crash_while_saving_an_index_keeps_the_previous_one(tmp_path, monkeypatch, where):
    import astrovl.clip.index as index_mod

    small_index(5).save(tmp_path / "idx")
    before = snapshot(tmp_path / "idx")

    def crash(*args, **kwargs):
        raise RuntimeError("killed")

    def crash_mid_vectors(path, *args, **kwargs):  # part of the vector file is on disk
        Path(path).write_bytes(b"partial")
        raise RuntimeError("killed")

    if where == "vectors":
        monkeypatch.setattr(index_mod, "write_vectors", crash_mid_vectors)
    else:  # the very end of the write, after every file is there
        monkeypatch.setattr(files_mod, "write_output_marker", crash)
    with pytest.raises(RuntimeError, match="killed"):
        small_index(9, seed=3).save(tmp_path / "idx")
    assert snapshot(tmp_path / "idx") == before
    assert len(EmbeddingIndex.load(tmp_path / "idx")) == 5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["idx"]


def test_index_records_its_image_root_relative_to_itself(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    index = small_index()
    index.image_root = str(images)
    index.save(tmp_path / "idx")
    manifest = json.loads((tmp_path / "idx" / "index.json").read_text())
    assert manifest["image_root"] == "../images"  # no absolute local path
    assert EmbeddingIndex.load(tmp_path / "idx").image_root == str(images.resolve())


# ---------------------------------------------------------------------------- models
def test_embedder_save_pretrained(tmp_path, user_dir, embedder, monkeypatch):
    with pytest.raises(OutputDirectoryError):
        embedder.save_pretrained(user_dir)
    assert_untouched(user_dir)
    out = embedder.save_pretrained(tmp_path / "model")
    embedder.save_pretrained(out)  # replacing an earlier model works
    assert CLIPEmbedder.from_pretrained(out).weights_digest == embedder.weights_digest
    before = snapshot(out)

    import safetensors.torch

    def crash(*args, **kwargs):
        raise RuntimeError("killed")

    monkeypatch.setattr(safetensors.torch, "save_model", crash)
    with pytest.raises(RuntimeError):
        CLIPEmbedder.from_config(TINY_CLIP_CONFIG, seed=5).save_pretrained(out)
    assert snapshot(out) == before


def test_index_is_not_an_embedder(tmp_path, embedder):
    small_index().save(tmp_path / "idx")
    before = snapshot(tmp_path / "idx")
    with pytest.raises(OutputDirectoryError, match="another kind"):
        embedder.save_pretrained(tmp_path / "idx")
    assert snapshot(tmp_path / "idx") == before


@pytest.fixture(scope="module")
def tiny_llava_dir(tmp_path_factory):
    testing = pytest.importorskip("astrovl.testing.llava")
    return testing.make_tiny_llava(tmp_path_factory.mktemp("llava") / "tiny")


def test_llava_save_pretrained(tmp_path, user_dir, tiny_llava_dir):
    from astrovl import AstroLLaVA

    model = AstroLLaVA.from_pretrained(tiny_llava_dir, device="cpu")
    with pytest.raises(OutputDirectoryError):
        model.save_pretrained(user_dir)
    assert_untouched(user_dir)
    out = model.save_pretrained(tmp_path / "llava")
    model.save_pretrained(out)
    assert (out / "config.json").is_file() and read_output_marker(out)["kind"] == "llava-model"
    assert AstroLLaVA.from_pretrained(out, device="cpu") is not None


def test_convert_llava_refuses_before_converting(user_dir, tmp_path):
    from astrovl.llava import convert_llava_checkpoint

    # refused before the source is even looked at (it does not exist here)
    with pytest.raises(OutputDirectoryError):
        convert_llava_checkpoint(tmp_path / "no-such-checkpoint", user_dir)
    assert_untouched(user_dir)


def test_training_checkpoint(tmp_path, user_dir):
    import torch

    from astrovl.training.common import load_checkpoint, save_checkpoint

    model = torch.nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    with pytest.raises(OutputDirectoryError):
        save_checkpoint(user_dir, model=model, optimizer=opt, scheduler=sched, state={"step": 1})
    assert_untouched(user_dir)
    ckpt = save_checkpoint(tmp_path / "ckpt", model=model, optimizer=opt, scheduler=sched, state={"step": 1})
    save_checkpoint(ckpt, model=model, optimizer=opt, scheduler=sched, state={"step": 2})
    assert load_checkpoint(ckpt, model=model, optimizer=opt, scheduler=sched)["step"] == 2


# ---------------------------------------------------------------------------- training runs
@pytest.fixture(scope="module")
def sky(tmp_path_factory):
    from astrovl.datasets import SyntheticSkyDataset

    return SyntheticSkyDataset.generate(tmp_path_factory.mktemp("sky") / "ds", n_images=24, image_size=32,
                                        seed=0, val_fraction=0.25, progress=False)


def test_train_clip_refuses_a_user_folder(user_dir, sky, embedder):
    from astrovl.training import CLIPTrainingConfig, train_clip

    cfg = CLIPTrainingConfig(mode="scratch", steps=1, batch_size=4, eval_every=1, output_dir=str(user_dir),
                             device="cpu", progress=False, tensorboard=False)
    with pytest.raises(OutputDirectoryError):
        train_clip(embedder, sky.split("train"), sky.split("val"), cfg)
    assert_untouched(user_dir)


def test_train_llava_refuses_a_user_folder(user_dir):
    from astrovl.training import LLaVATrainingConfig, train_llava

    with pytest.raises(OutputDirectoryError):
        train_llava("unused-model", "unused-data", LLaVATrainingConfig(output_dir=str(user_dir)))
    assert_untouched(user_dir)


def test_demo_refuses_a_user_folder(user_dir):
    from astrovl.demo import run_demo

    with pytest.raises(OutputDirectoryError):
        run_demo(user_dir, quick=True, progress=False)
    assert_untouched(user_dir)


# ---------------------------------------------------------------------------- datasets
def test_synthetic_generate(tmp_path, user_dir):
    from astrovl.datasets import SyntheticSkyDataset

    kw = dict(n_images=8, image_size=32, classes=["elliptical", "cigar"], progress=False)
    with pytest.raises(OutputDirectoryError):
        SyntheticSkyDataset.generate(user_dir, **kw)
    assert_untouched(user_dir)
    ds = SyntheticSkyDataset.generate(tmp_path / "sky", **kw)
    again = SyntheticSkyDataset.generate(tmp_path / "sky", **kw)  # resumes in its own folder
    assert len(ds) == len(again) == 8
    assert read_output_marker(tmp_path / "sky")["kind"] == "synthetic-dataset"


def test_hubble_builder_refuses_a_user_folder(user_dir):
    from astrovl.datasets import HubblePreviewDatasetBuilder

    obs = Table({"obsid": ["1"], "obs_id": ["j8pu0y010"], "proposal_id": ["10000"]})
    with pytest.raises(OutputDirectoryError):
        HubblePreviewDatasetBuilder(obs, user_dir, caption_source="title")
    with pytest.raises(OutputDirectoryError):  # before MAST is asked anything
        HubblePreviewDatasetBuilder.from_proposals([5371], user_dir, caption_source="title")
    assert_untouched(user_dir)


def test_outreach_builder_refuses_a_user_folder(user_dir, tmp_path):
    from astrovl.datasets import OutreachDatasetBuilder

    with pytest.raises(OutputDirectoryError):
        OutreachDatasetBuilder([{"image": "https://example.org/a.jpg", "caption": "A."}], user_dir)
    assert_untouched(user_dir)


def test_disk_image_cache(tmp_path, user_dir):
    from astrovl.datasets.imagecache import DiskImageCache

    with pytest.raises(OutputDirectoryError):
        DiskImageCache(user_dir, ["a", "b"], (4, 4))
    assert_untouched(user_dir)
    cache = DiskImageCache(tmp_path / "cache", ["a", "b"], (4, 4))
    cache.put(0, np.full((4, 4), 7, np.uint8))
    assert DiskImageCache(tmp_path / "cache", ["a", "b"], (4, 4)).get(0)[0, 0] == 7  # reused
    cache.remove()
    assert not (tmp_path / "cache").exists()


# ---------------------------------------------------------------------------- napari
def test_napari_build_index_job_refuses_before_embedding(user_dir, tmp_path, m13_path):
    pytest.importorskip("magicgui")
    from astrovl_napari._jobs import build_index_job, run_job

    class Registry:
        def get(self, spec):  # pragma: no cover - must not be reached
            raise AssertionError("the model was loaded before the output folder was checked")

    with pytest.raises(OutputDirectoryError):
        run_job(build_index_job(Registry(), None, [m13_path], save_to=user_dir))
    assert_untouched(user_dir)


# ---------------------------------------------------------------------------- command line
def _records_file(tmp_path: Path) -> Path:
    path = tmp_path / "records.json"
    path.write_text(json.dumps([{"image": "https://example.org/a.jpg", "caption": "A galaxy."}]))
    return path


CLI_COMMANDS = {
    "index build": lambda d, t, m13: ["index", "build", str(m13), "--index", str(d), "--model", "tiny"],
    "train-clip": lambda d, t, m13: ["train-clip", str(t / "no-dataset"), "--output", str(d)],
    "train-llava": lambda d, t, m13: ["train-llava", "--stage", "1", "--data", str(t / "no-data.json"), "--output", str(d)],
    "demo": lambda d, t, m13: ["demo", "--output", str(d), "--quick"],
    "synth": lambda d, t, m13: ["synth", str(d), "--n-images", "11", "--image-size", "32"],
    "build-hubble": lambda d, t, m13: ["build-hubble", str(d), "--proposal-id", "5371"],
    "build-outreach": lambda d, t, m13: ["build-outreach", str(d), str(_records_file(t))],
    "convert-llava": lambda d, t, m13: ["convert-llava", str(t / "no-checkpoint"), str(d)],
}


@pytest.mark.parametrize("command", sorted(CLI_COMMANDS))
def test_cli_refuses_a_user_folder(command, user_dir, tmp_path, m13_path, capsys, monkeypatch):
    import astroquery.mast

    def no_network(*args, **kwargs):  # pragma: no cover - must not be reached
        raise AssertionError("MAST was queried before the output folder was checked")

    monkeypatch.setattr(astroquery.mast.Observations, "query_criteria", no_network)
    assert main(CLI_COMMANDS[command](user_dir, tmp_path, m13_path)) == 1
    err = capsys.readouterr().err
    assert "error:" in err and str(user_dir) in err and "not empty" in err
    assert_untouched(user_dir)


def test_cli_index_build_replaces_its_own_index(tmp_path, m13_path, ngc1316_path, embedder, capsys):
    model = embedder.save_pretrained(tmp_path / "model")
    images = tmp_path / "images"
    images.mkdir()
    for p in (m13_path, ngc1316_path):
        (images / Path(p).name).write_bytes(Path(p).read_bytes())
    before = snapshot(images)
    assert main(["index", "build", str(images / "m13.fits"), "--index", str(tmp_path / "idx"),
                 "--model", str(model)]) == 0
    assert main(["index", "build", str(images), "--index", str(tmp_path / "idx"), "--model", str(model)]) == 0
    index = EmbeddingIndex.load(tmp_path / "idx")
    assert len(index) == 2 and index.image_root == str(images.resolve())
    # the images it indexed are untouched, and the index cannot be written over them
    assert main(["index", "build", str(images), "--index", str(images), "--model", str(model)]) == 1
    assert "not empty" in capsys.readouterr().err
    assert snapshot(images) == before


def test_serve_thumbnail_cache_never_fills_a_user_folder(user_dir, tmp_path, m13_path, caplog):
    from astrovl.serve.images import IndexImages

    images = tmp_path / "images"
    images.mkdir()
    (images / "m13.fits").write_bytes(Path(m13_path).read_bytes())
    meta = Table({"path": [str(images / "m13.fits")]})
    refused = IndexImages(meta, image_root=images, cache_dir=user_dir, size=32)
    png, _ = refused.thumbnail(0)
    assert png.startswith(b"\x89PNG") and "not cached" in caplog.text  # served all the same
    assert_untouched(user_dir)
    cache = tmp_path / "thumbs"
    used = IndexImages(meta, image_root=images, cache_dir=cache, size=32)
    assert used.thumbnail(0)[0] == png
    assert len(list(cache.rglob("*.png"))) == 1 and read_output_marker(cache)["kind"] == "thumbnail-cache"
    assert IndexImages(meta, image_root=images, cache_dir=cache, size=32).thumbnail(0)[0] == png
