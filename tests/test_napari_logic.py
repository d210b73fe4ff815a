"""Widget logic without a viewer: regions, results, the model registry and the jobs."""

from __future__ import annotations

import shutil
import threading
import time

import numpy as np
import pytest
from astropy.io import fits
from astropy.table import Table
from astropy.wcs import WCS

from astrovl.exceptions import ImageInputError, IndexMismatchError
from astrovl_napari import ModelRegistry, ModelSpec, read_fits
from astrovl_napari._jobs import (
    Step,
    build_index_job,
    caption_job,
    classify_job,
    find_images,
    open_index_job,
    run_job,
    search_job,
)
from astrovl_napari._regions import (
    BBox,
    RegionRequest,
    display_origin,
    field_of_view_bbox,
    field_of_view_world,
    leading_indices,
    region_request,
    shape_bbox,
    world_box_to_bbox,
)
from astrovl_napari._results import (
    classification_rows,
    format_conversation,
    hits_from_table,
    make_record,
    make_thumbnail,
    parse_categories,
    records_of,
    resolve_image_path,
    store_record,
)

napari_layers = pytest.importorskip("napari.layers")


def fits_layer(path):
    (data, kwargs, _), = read_fits(path)[:1]
    return napari_layers.Image(data, **kwargs)


# ------------------------------------------------------------------------------ regions
def test_world_box_to_bbox_on_a_flipped_fits_layer(m13_path):
    layer = fits_layer(m13_path)  # scale (-1, 1): world y = -row
    box = world_box_to_bbox(layer, [[-50.0, 10.0], [-20.0, 40.0]])
    # rows 20..50 and columns 10..40 are touched (pixel i covers [i - 0.5, i + 0.5))
    assert box == BBox(20, 51, 10, 41)
    assert box.height == 31 and box.width == 31
    assert str(box) == "[20:51, 10:41]"
    clipped = world_box_to_bbox(layer, [[-1000.0, -1000.0], [1000.0, 50.0]])
    assert clipped == BBox(0, 300, 0, 51)
    with pytest.raises(ValueError, match="does not overlap"):
        world_box_to_bbox(layer, [[10.0, 10.0], [30.0, 30.0]])  # positive world y: off the image
    with pytest.raises(ValueError, match="at least 8x8"):
        world_box_to_bbox(layer, [[-3.0, 0.0], [0.0, 100.0]])


def test_field_of_view(m13_path):
    corners = field_of_view_world((0.0, -150.0, 150.0), 2.0, (200, 100))
    np.testing.assert_allclose(corners, [[-200.0, 125.0], [-100.0, 175.0]])
    layer = fits_layer(m13_path)
    box = field_of_view_bbox(layer, center=(-150.0, 150.0), zoom=2.0, canvas_size=(200, 100))
    assert box == BBox(100, 201, 125, 176)
    whole = field_of_view_bbox(layer, center=(-150.0, 150.0), zoom=0.1, canvas_size=(600, 800))
    assert whole == BBox(0, 300, 0, 300)
    with pytest.raises(ValueError, match="zoom"):
        field_of_view_world((0, 0), 0.0, (10, 10))


def test_shape_bbox_selected_or_last_rectangle(m13_path):
    layer = fits_layer(m13_path)
    shapes = napari_layers.Shapes(
        [np.array([[-100, 20], [-100, 60], [-60, 60], [-60, 20]], float),
         np.array([[-290, 200], [-290, 290], [-250, 290], [-250, 200]], float)],
        shape_type=["rectangle", "rectangle"])
    assert shape_bbox(shapes, layer) == BBox(250, 291, 200, 291)  # last rectangle
    shapes.selected_data = {0}
    assert shape_bbox(shapes, layer) == BBox(60, 101, 20, 61)
    assert shape_bbox(shapes, layer, index=1) == BBox(250, 291, 200, 291)
    with pytest.raises(ValueError, match="out of range"):
        shape_bbox(shapes, layer, index=5)
    with pytest.raises(ValueError, match="no shape"):
        shape_bbox(napari_layers.Shapes(), layer)


def test_display_origin_and_leading_indices(rng):
    flipped = napari_layers.Image(np.zeros((20, 20)), scale=(-1, 1))
    plain = napari_layers.Image(np.zeros((20, 20)))
    assert display_origin(flipped) == "lower"
    assert display_origin(plain) == "upper"
    assert display_origin(plain, camera_vertical="up") == "lower"
    cube = napari_layers.Image(rng.normal(size=(6, 20, 20)), scale=(1, -1, 1))
    assert leading_indices(cube, (3.2, -5.0, 4.0)) == (3,)
    assert leading_indices(cube, (99.0, 0.0, 0.0)) == (5,)
    assert leading_indices(cube) == (0,)
    assert leading_indices(plain, (1.0, 2.0)) == ()


def test_region_request_cutout_keeps_wcs_and_scaling(m13_path):
    from astrovl import load_image

    layer = fits_layer(m13_path)
    request = region_request(layer, "field of view", center=(-150.0, 150.0), zoom=2.0,
                             canvas_size=(200, 100))
    assert request.bbox == BBox(100, 201, 125, 176)
    assert request.origin == "lower" and request.wcs is not None
    image = request.load()
    raw = fits.getdata(m13_path).astype(np.float32)
    np.testing.assert_array_equal(image.raw, raw[100:201, 125:176])
    full_wcs = WCS(fits.getheader(m13_path)).celestial
    np.testing.assert_allclose(image.wcs.pixel_to_world_values(0, 0),
                               full_wcs.pixel_to_world_values(125, 100), rtol=1e-10)
    assert image.header["CRPIX1"] == pytest.approx(full_wcs.wcs.crpix[0] - 125)
    assert image.meta["origin"] == "lower" and image.meta["bbox"] == [100, 201, 125, 176]
    assert image.source == "m13[100:201, 125:176]"
    # the library's default scaling, recomputed on the region
    reference = load_image(raw[100:201, 125:176])
    np.testing.assert_allclose(image.data, reference.data, atol=1e-6)
    # shown as on screen: the top row of the picture is the last FITS row of the region
    assert np.array_equal(np.asarray(image.to_pil("L"))[0], np.asarray(reference.to_pil("L"))[0])

    whole = region_request(layer).load()
    assert whole.shape == (300, 300)
    with pytest.raises(ValueError, match="shapes layer"):
        region_request(layer, "shapes rectangle")
    with pytest.raises(ValueError, match="not known"):
        region_request(layer, "everything")
    with pytest.raises(ValueError, match="not an image layer"):
        region_request(napari_layers.Shapes(), "whole layer")


def test_region_of_a_cube_and_a_picture(rng, xdf_array):
    cube = np.stack([np.full((30, 30), float(k)) + rng.normal(0, 0.1, (30, 30)) for k in range(4)])
    layer = napari_layers.Image(cube, scale=(1, -1, 1), name="cube")
    request = region_request(layer, world_point=(2.0, 0.0, 0.0))
    assert request.lead == (2,)
    image = request.load()
    assert image.shape == (30, 30) and abs(float(image.raw.mean()) - 2.0) < 0.05
    assert request.describe() == "cube[2][0:30, 0:30]"

    picture = napari_layers.Image(xdf_array, rgb=True, name="xdf")
    req = region_request(picture)
    assert req.origin == "upper" and req.rgb
    img = req.load()
    np.testing.assert_array_equal(np.asarray(img.to_pil()), xdf_array)  # unchanged pixels


def test_region_without_finite_pixels():
    layer = napari_layers.Image(np.full((20, 20), np.nan))
    with pytest.raises(ImageInputError):
        RegionRequest(layer.data, "nan", BBox(0, 20, 0, 20)).load()


# ------------------------------------------------------------------------------ results
def test_parse_categories():
    assert parse_categories(" spiral galaxy \n\nglobular  cluster\nspiral galaxy") == [
        "spiral galaxy", "globular cluster"]
    assert parse_categories("a, b; c") == ["a", "b", "c"]
    with pytest.raises(ValueError, match="empty"):
        parse_categories(" \n , ")


def test_records_roundtrip_and_conversation_text():
    meta: dict = {"header": None}
    cap = make_record("caption", "A globular cluster.", model="m", region="m13[0:300, 0:300]",
                      bbox=[0, 300, 0, 300])
    qa = make_record("question", "About 10 kpc <away>.", question="How far?", model="m",
                     region="m13[0:10, 0:10]")
    store_record(meta, "answers", cap)
    store_record(meta, "answers", qa)
    stored = records_of(meta, "answers")
    assert [r["kind"] for r in stored] == ["caption", "question"]
    assert stored[0]["bbox"] == [0, 300, 0, 300] and stored[1]["bbox"] is None
    assert records_of(meta, "classification") == [] and records_of(None, "answers") == []
    text = format_conversation(stored)
    assert text == ("Caption m13[0:300, 0:300]:\nA globular cluster.\n\n"
                    "Q m13[0:10, 0:10]: How far?\nAbout 10 kpc <away>.")
    meta["astrovl"] = "not a dict"
    store_record(meta, "answers", cap)
    assert len(records_of(meta, "answers")) == 1


def test_classification_rows_sorted():
    table = Table(rows=[(0, "s", 2, "b", 0.2, 0.3), (0, "s", 1, "a", 0.5, 0.6)],
                  names=("image", "source", "rank", "category", "score", "probability"))
    rows = classification_rows(table)
    assert [r["category"] for r in rows] == ["a", "b"]
    assert rows[0] == {"rank": 1, "category": "a", "score": 0.5, "probability": 0.6}
    assert classification_rows(Table()) == []


def test_hits_and_paths(tmp_path, m13_path):
    local = tmp_path / "index"
    local.mkdir()
    shutil.copy(m13_path, tmp_path / "m13.fits")
    assert resolve_image_path("m13.fits", local) == (tmp_path / "m13.fits").resolve()
    assert resolve_image_path(f"{m13_path}[0]") == m13_path.resolve()
    assert resolve_image_path("<ndarray (3, 3)>") is None
    assert resolve_image_path("nowhere.fits", local) is None
    table = Table({"rank": [1, 2], "score": np.array([0.9, 0.5], np.float32), "row": [4, 0],
                   "source": [str(m13_path), "<ndarray (8, 8)>"]})
    hits = hits_from_table(table)
    assert hits[0].path == m13_path.resolve() and hits[0].label == "m13.fits"
    assert hits[0].score == pytest.approx(0.9) and hits[0].text() == "1.  0.900  m13.fits"
    assert hits[1].path is None and hits[1].label == "<ndarray (8, 8)>"


def test_thumbnail_is_right_way_up(m13_path):
    from astrovl import load_image

    thumb = make_thumbnail(m13_path, 50)
    assert thumb.shape == (50, 50, 3) and thumb.dtype == np.uint8
    full = load_image(m13_path).to_uint8()  # row 0 at the top (flipped FITS)
    small = np.asarray(load_image(m13_path).to_pil().resize((50, 50)))[..., 0]
    assert np.corrcoef(small.ravel().astype(float), thumb[..., 0].ravel().astype(float))[0, 1] > 0.95
    assert full.shape == (300, 300)
    with pytest.raises(ValueError):
        make_thumbnail(m13_path, 4)


# ------------------------------------------------------------------------------ registry
def test_registry_loads_once_and_shares(tmp_path):
    calls = []
    started = threading.Event()

    def loader(spec):
        calls.append(spec)
        started.set()
        time.sleep(0.2)
        return object()

    registry = ModelRegistry(loader=loader)
    spec = ModelSpec("clip", str(tmp_path), device="cpu")
    results = []
    threads = [threading.Thread(target=lambda: results.append(registry.get(spec))) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and registry.load_count == 1
    assert results[0] is results[1] is results[2]
    # the same directory spelled differently is the same model
    assert registry.get(ModelSpec("clip", f"{tmp_path}/./", device=" CPU ")) is results[0]
    assert calls[0].name == str(tmp_path.resolve()) and calls[0].pretrained is None
    other = registry.get(ModelSpec("llava", str(tmp_path), device="cpu"))
    assert other is not results[0] and registry.load_count == 2
    assert registry.is_loaded(spec)
    registry.clear("clip")
    assert not registry.is_loaded(spec) and len(registry.loaded()) == 1


def test_model_spec_defaults():
    from astrovl import conf

    spec = ModelSpec("clip").normalized()
    assert (spec.name, spec.pretrained, spec.device) == (conf.clip_model, conf.clip_pretrained or None, "auto")
    spec = ModelSpec("llava", "", "ignored", "").normalized()
    assert (spec.name, spec.pretrained) == (conf.llava_model, None)
    assert "on auto" in spec.describe()
    with pytest.raises(ValueError, match="kind"):
        ModelSpec("gpt")


# ------------------------------------------------------------------------------ jobs
@pytest.fixture(scope="module")
def tiny_clip_dir(tmp_path_factory):
    from astrovl.clip import TINY_CLIP_CONFIG, CLIPEmbedder

    path = tmp_path_factory.mktemp("clip") / "tiny-clip"
    CLIPEmbedder.from_config(TINY_CLIP_CONFIG, device="cpu", seed=0).save_pretrained(path)
    return path


@pytest.fixture
def image_folder(tmp_path, m13_path, ngc1316_path, xdf_array):
    from PIL import Image

    folder = tmp_path / "images"
    (folder / "sub").mkdir(parents=True)
    (folder / ".hidden").mkdir()
    shutil.copy(m13_path, folder / "m13.fits")
    shutil.copy(ngc1316_path, folder / "sub" / "ngc1316.fits")
    Image.fromarray(xdf_array).save(folder / "xdf.png")
    (folder / "broken.fits").write_bytes(b"SIMPLE  = broken")
    (folder / ".hidden" / "skip.fits").write_bytes(b"")
    (folder / "notes.txt").write_text("not an image")
    return folder


def test_find_images(image_folder):
    names = [p.relative_to(image_folder).as_posix() for p in find_images(image_folder)]
    assert names == ["broken.fits", "m13.fits", "sub/ngc1316.fits", "xdf.png"]
    assert [p.name for p in find_images(image_folder, recursive=False)] == [
        "broken.fits", "m13.fits", "xdf.png"]
    with pytest.raises(NotADirectoryError):
        find_images(image_folder / "m13.fits")


def test_build_open_and_search_index(tiny_clip_dir, image_folder, tmp_path, m13_path):
    registry = ModelRegistry()
    spec = ModelSpec("clip", str(tiny_clip_dir), device="cpu")
    steps: list[Step] = []
    result = run_job(build_index_job(registry, spec, find_images(image_folder),
                                     save_to=tmp_path / "idx", batch_size=2), steps.append)
    assert [p.name for p, _ in result.skipped] == ["broken.fits"]
    assert [p.name for p in result.paths] == ["m13.fits", "ngc1316.fits", "xdf.png"]
    assert len(result.index) == 3 and result.saved_to == tmp_path / "idx"
    assert steps[-1] == Step(4, 4, "indexed 3 images")
    assert [s.done for s in steps] == [0, 2, 4, 4]

    index = run_job(open_index_job(registry, spec, tmp_path / "idx"))
    assert len(index) == 3 and registry.load_count == 1  # the model was shared
    np.testing.assert_allclose(index.vectors, result.index.vectors, atol=1e-6)

    hits = run_job(search_job(index, "a dense globular cluster", k=3, thumbnail_size=32,
                              index_dir=tmp_path / "idx"))
    assert [h.rank for h in hits] == [1, 2, 3]
    assert sorted({h.label for h in hits}) == ["m13.fits", "ngc1316.fits", "xdf.png"]
    scores = [h.score for h in hits]
    assert scores == sorted(scores, reverse=True)
    assert all(h.thumbnail is not None and max(h.thumbnail.shape[:2]) == 32 for h in hits)

    # querying with the whole M13 layer finds the M13 file first, with cosine ~1
    request = region_request(fits_layer(m13_path))
    hits = run_job(search_job(index, request, k=2))
    assert hits[0].label == "m13.fits" and hits[0].score == pytest.approx(1.0, abs=1e-3)

    with pytest.raises(ValueError, match="empty"):
        run_job(search_job(index, "   "))
    with pytest.raises(TypeError):
        run_job(search_job(index, 3))


def test_open_index_with_another_model_is_refused(tiny_clip_dir, image_folder, tmp_path):
    from astrovl.clip import TINY_CLIP_CONFIG, CLIPEmbedder

    registry = ModelRegistry()
    spec = ModelSpec("clip", str(tiny_clip_dir), device="cpu")
    run_job(build_index_job(registry, spec, [image_folder / "m13.fits"], save_to=tmp_path / "idx"))
    other_dir = tmp_path / "other-clip"
    CLIPEmbedder.from_config(TINY_CLIP_CONFIG, device="cpu", seed=1).save_pretrained(other_dir)
    with pytest.raises(IndexMismatchError):
        run_job(open_index_job(registry, ModelSpec("clip", str(other_dir), device="cpu"),
                               tmp_path / "idx"))
    with pytest.raises(ValueError, match="none of the 1 images"):
        run_job(build_index_job(registry, spec, [image_folder / "broken.fits"]))
    with pytest.raises(ValueError, match="no image files"):
        run_job(build_index_job(registry, spec, []))


def test_classify_job(tiny_clip_dir, m13_path):
    from astrovl.clip import HUBBLE_CATEGORIES

    registry = ModelRegistry()
    spec = ModelSpec("clip", str(tiny_clip_dir), device="cpu")
    request = region_request(fits_layer(m13_path))
    record = run_job(classify_job(registry, spec, request, top_k=5))
    rows = record["rows"]
    assert record["kind"] == "classification" and record["categories"] == "default"
    assert [r["rank"] for r in rows] == [1, 2, 3, 4, 5]
    assert all(r["category"] in HUBBLE_CATEGORIES for r in rows)
    assert [r["score"] for r in rows] == sorted((r["score"] for r in rows), reverse=True)
    assert record["answer"] == rows[0]["category"]
    assert 0 < sum(r["probability"] for r in rows) <= 1 + 1e-6
    mine = ["globular cluster", "spiral galaxy", "nebula"]
    record = run_job(classify_job(registry, spec, request, categories=mine, top_k=10))
    assert sorted(r["category"] for r in record["rows"]) == sorted(mine)
    assert record["n_categories"] == 3 and record["region"] == "m13[0:300, 0:300]"
    assert registry.load_count == 1


@pytest.fixture(scope="module")
def tiny_llava_dir(tmp_path_factory):
    testing = pytest.importorskip("astrovl.testing.llava")
    return testing.make_tiny_llava(tmp_path_factory.mktemp("llava") / "tiny-llava")


def test_caption_and_ask_jobs(tiny_llava_dir, m13_path):
    registry = ModelRegistry()
    spec = ModelSpec("llava", str(tiny_llava_dir), device="cpu")
    request = region_request(fits_layer(m13_path), "field of view", center=(-150.0, 150.0),
                             zoom=2.0, canvas_size=(200, 100))
    steps: list[Step] = []
    record = run_job(caption_job(registry, spec, request, max_new_tokens=5), steps.append)
    # the answer is the model's own on the region's pixels
    model, region = registry.get(spec), request.load().to_pil()
    assert record["kind"] == "caption" and record["answer"] == model.caption(region, max_new_tokens=5)
    assert record["bbox"] == [100, 201, 125, 176] and record["question"] is None
    assert [s.done for s in steps] == [0, 1, 2, 3]
    record = run_job(caption_job(registry, spec, request, question=" What is it? ",
                                 max_new_tokens=5))
    assert record["kind"] == "question" and record["question"] == "What is it?"
    assert record["answer"] == model.ask(region, "What is it?", max_new_tokens=5)
    assert registry.load_count == 1
    with pytest.raises(ValueError, match="empty"):
        run_job(caption_job(registry, spec, request, question="  "))
