"""What the commands do with their inputs and how they print results.

* ``--hdu``/``--plane``: one syntax, parsed once, read by the library's image
  input code; the library's hints (``hdu=``) become the flags (``--hdu``) on the
  command line.
* Every command checks its inputs and output names before a model loads.
* Commands on many files report unreadable files one by one and go on.
* Tables print rounded and wrapped; files keep full precision.
"""

from __future__ import annotations

import argparse
import shutil

import numpy as np
import pytest
from astropy.io import fits
from astropy.table import Table

from astrovl import AstroLLaVA, load_image
from astrovl.cli import main
from astrovl.cli._common import display_value, error_message, format_table, parse_hdu
from astrovl.clip import TINY_CLIP_CONFIG, CLIPEmbedder, EmbeddingIndex
from astrovl.exceptions import ImageFileError, ImageInputError
from astrovl.imaging import check_image
from astrovl.imaging.inputs import ImageFile, format_hdu
from astrovl.imaging.inputs import parse_hdu as parse_hdu_text


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("clip") / "tiny"
    CLIPEmbedder.from_config(TINY_CLIP_CONFIG, seed=0).save_pretrained(path)
    return path


@pytest.fixture
def nan_file(tmp_path):
    """A FITS file whose headers are fine but whose pixels are all NaN."""
    path = tmp_path / "nan.fits"
    fits.PrimaryHDU(np.full((32, 32), np.nan, dtype=np.float32)).writeto(path)
    return path


# ---------------------------------------------------------------------- --hdu syntax
def test_hdu_text_parses_and_prints_back():
    for text, value in (("1", 1), ("-1", -1), ("SCI", "SCI"), ("sci", "SCI"), ("SCI,2", ("SCI", 2)),
                        (" sci , 2 ", ("SCI", 2))):
        assert parse_hdu_text(text) == value
        assert parse_hdu_text(format_hdu(value)) == value
    for bad in ("", "SCI,x", ",2"):
        with pytest.raises(ValueError, match="EXTNAME"):
            parse_hdu_text(bad)
    with pytest.raises(argparse.ArgumentTypeError, match="integer EXTVER"):
        parse_hdu("SCI,two")


def test_bad_hdu_is_a_usage_error(m13_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["embed", str(m13_path), "--hdu", "SCI,two"])
    assert exit_info.value.code == 2 and "integer EXTVER" in capsys.readouterr().err


def test_image_file_reads_its_hdu_and_plane(acs_path, tmp_path):
    chip2 = load_image(ImageFile(acs_path, hdu=("SCI", 2)))
    np.testing.assert_array_equal(chip2.raw, load_image(acs_path, hdu=("SCI", 2)).raw)
    cube = np.arange(3 * 8 * 8, dtype=np.float32).reshape(3, 8, 8)
    fits.PrimaryHDU(cube).writeto(tmp_path / "c.fits")
    np.testing.assert_array_equal(load_image(ImageFile(tmp_path / "c.fits", plane=1)).raw, cube[1])
    assert load_image(ImageFile(acs_path, hdu=1), hdu=4).meta["hdu"] == 4  # an explicit argument wins


# ---------------------------------------------------------------------- messages name the flag
def test_library_says_hdu_and_the_command_line_says_flag(acs_path, tiny_dir, capsys):
    with pytest.raises(ImageInputError) as info:
        load_image(acs_path)
    assert "hdu=('SCI', 1), hdu=('SCI', 2)" in str(info.value)
    assert "--hdu SCI,1, --hdu SCI,2" in error_message(info.value)
    assert main(["embed", str(acs_path), "--model", str(tiny_dir)]) == 1
    err = capsys.readouterr().err
    assert "choose one with --hdu SCI,1, --hdu SCI,2" in err and "hdu=" not in err
    assert main(["embed", str(acs_path), "--model", str(tiny_dir), "--hdu", "SCI,7"]) == 1
    err = capsys.readouterr().err
    assert "--hdu SCI,7 does not exist" in err and "hdu=" not in err


def test_all_nan_image_suggests_both_flags(nan_file, tiny_dir, capsys):
    with pytest.raises(ImageInputError, match="with hdu= or plane="):
        load_image(nan_file)
    assert main(["embed", str(nan_file), "--model", str(tiny_dir), "--on-error", "stop"]) == 1
    assert "choose another HDU or plane with --hdu or --plane" in capsys.readouterr().err


def test_acs_chips_from_the_command_line(acs_path, tiny_dir, tmp_path):
    """The real two-chip ACS file: each chip by name and version, as the library reads it."""
    emb = CLIPEmbedder.from_pretrained(tiny_dir)
    for text, hdu in (("SCI,1", ("SCI", 1)), ("4", 4)):
        assert main(["embed", str(acs_path), "--model", str(tiny_dir), "--hdu", text,
                     "--save", str(tmp_path / "v.npy")]) == 0
        expected = emb.embed_images(load_image(acs_path, hdu=hdu), progress=False)
        np.testing.assert_allclose(np.load(tmp_path / "v.npy"), expected, atol=1e-5)


# ---------------------------------------------------------------------- header-only checks
def test_check_image_reads_headers_only(acs_path, m13_path, tmp_path, monkeypatch):
    import astrovl.imaging.readers as readers

    monkeypatch.setattr(readers, "read_hdu_data", lambda *a: pytest.fail("pixels were read"))
    check_image(m13_path)
    check_image(ImageFile(acs_path, hdu=("SCI", 2)))
    with pytest.raises(ImageInputError, match="2 SCI images"):
        check_image(acs_path)
    with pytest.raises(ImageInputError, match=r"hdu=9 does not exist"):
        check_image(acs_path, hdu=9)
    with pytest.raises(ImageFileError, match="does not exist"):
        check_image(tmp_path / "missing.fits")
    fits.PrimaryHDU(np.zeros((4, 8, 8), np.float32)).writeto(tmp_path / "cube.fits")
    with pytest.raises(ImageInputError, match="choose one with plane="):
        check_image(tmp_path / "cube.fits")
    with pytest.raises(ImageInputError, match="plane=5 is out of range"):
        check_image(tmp_path / "cube.fits", plane=5)
    check_image(tmp_path / "cube.fits", plane=3)
    (tmp_path / "notes.png").write_text("not a picture")
    with pytest.raises(ImageFileError, match="neither a FITS file nor a readable picture"):
        check_image(tmp_path / "notes.png")


# ---------------------------------------------------------------------- inputs before models
@pytest.fixture
def no_models(monkeypatch):
    """Loading any model fails the test: the command had to stop before."""
    import astrovl.generation

    def refuse(*args, **kwargs):
        pytest.fail("a model was loaded before the inputs were checked")

    monkeypatch.setattr(AstroLLaVA, "from_pretrained", classmethod(refuse))
    monkeypatch.setattr(CLIPEmbedder, "from_pretrained", classmethod(refuse))
    monkeypatch.setattr(EmbeddingIndex, "load", classmethod(refuse))
    monkeypatch.setattr(astrovl.generation.ConversationGenerator, "from_pretrained", classmethod(refuse))


def _bad_inputs(tmp, m13, acs):
    missing = str(tmp / "missing.fits")
    return [
        (["caption", missing], "does not exist"),
        (["caption", str(m13), "-o", str(tmp / "c.txt")], "use a .ecsv, .csv or .json file name"),
        (["caption", str(m13), "--prompt", "  "], "--prompt is empty"),
        (["caption", str(m13), "--batch-size", "0"], "--batch-size 0"),
        (["caption", str(acs)], "--hdu SCI,1"),
        (["ask", missing, "What is it?"], "does not exist"),
        (["ask", str(m13), " "], "the question is empty"),
        (["ask", str(m13), "What?", "--plane", "2"], "--plane 2 given for a 2-D image"),
        (["embed", str(m13), "-o", str(tmp / "e.fits")], "use a .ecsv, .csv or .json"),
        (["embed", str(m13), "--save", str(tmp / "e.csv")], "give a .npy file name"),
        (["embed", missing, "--on-error", "stop"], "does not exist"),
        (["index", "build", missing, "--index", str(tmp / "i")], "does not exist"),
        (["index", "add", missing, "--index", str(tmp / "i")], "does not exist"),
        (["search", str(tmp), " "], "the text query is empty"),
        (["search", str(tmp), "--image", missing], "does not exist"),
        (["search", str(tmp), "x", "-o", str(tmp / "h.xlsx")], "use a .ecsv"),
        (["classify", str(m13), "--categories", str(tmp / "none.txt")], "none.txt"),
        (["classify", str(acs)], "--hdu SCI,1"),
        (["evaluate", "retrieval", str(tmp), "-o", str(tmp / "r.txt")], "use a .ecsv"),
        (["evaluate", "galaxy10", "--plot", str(tmp / "g.pdf")], "give a .png file name"),
        (["conversations", str(tmp / "ds"), "-o", str(tmp / "c.jsonl")], "give a .json file name"),
        (["conversations", str(tmp / "ds"), "-o", str(tmp / "c.json")], "ds"),
        (["conversations", str(tmp), "-o", str(tmp / "c.json"), "--max-new-tokens", "50"], "at least"),
        (["summarize", str(tmp / "a.txt"), "-o", str(tmp / "s.txt")], "use a .ecsv"),
    ]


def test_inputs_are_checked_before_any_model_loads(no_models, tmp_path, m13_path, acs_path, capsys):
    from astrovl.datasets import SyntheticSkyDataset

    SyntheticSkyDataset.generate(tmp_path, n_images=2, image_size=32, classes=["elliptical", "cigar"], seed=0,
                                 val_fraction=0.5, progress=False)
    for argv, message in _bad_inputs(tmp_path, m13_path, acs_path):
        capsys.readouterr()
        assert main(argv) == 1, argv
        err = capsys.readouterr().err
        assert message in err, (argv, err)


# ---------------------------------------------------------------------- many files
def test_one_unreadable_file_does_not_stop_the_batch(tmp_path, tiny_dir, m13_path, ngc1316_path, nan_file,
                                                     capsys):
    """The all-NaN file passes the header check and fails while embedding: it alone is left out."""
    emb = CLIPEmbedder.from_pretrained(tiny_dir)
    capsys.readouterr()
    rc = main(["embed", str(m13_path), str(nan_file), str(ngc1316_path), "--model", str(tiny_dir),
               "--batch-size", "3", "--save", str(tmp_path / "v.npy"), "-o", str(tmp_path / "t.ecsv")])
    out = capsys.readouterr()
    assert rc == 2
    assert list(Table.read(tmp_path / "t.ecsv")["image"]) == [str(m13_path), str(ngc1316_path)]
    np.testing.assert_allclose(np.load(tmp_path / "v.npy"),
                               emb.embed_images([m13_path, ngc1316_path], progress=False), atol=1e-5)
    assert f"skipped {nan_file}" in out.err and "1 of 3 files could not be read and were skipped" in out.err
    # only unreadable files: an error, nothing written
    assert main(["embed", str(nan_file), "--model", str(tiny_dir), "-o", str(tmp_path / "n.ecsv")]) == 1
    assert not (tmp_path / "n.ecsv").exists()


# ---------------------------------------------------------------------- printed tables
def test_numbers_are_rounded_for_display():
    assert display_value(5.997063636779785) == "5.997"
    assert display_value(0.0002500000000000001) == "0.00025"
    assert display_value(np.float32(0.1234567)) == "0.1235"
    assert display_value(np.int64(7)) == "7" and display_value("text") == "text"
    assert display_value(np.ma.masked) == ""


def test_text_is_left_aligned_and_wrapped_to_the_width():
    caption = ("A bright globular cluster of old stars fills the frame, densest at its core, with fainter "
               "stars thinning out towards the edges and a few foreground stars scattered around it. ") * 3
    table = Table({"image": ["m13.fits", "ngc1316.fits"], "caption": [caption, "A galaxy."],
                   "score": [0.123456789, 12.5]})
    text = format_table(table, width=80)
    lines = text.splitlines()
    assert all(len(ln) <= 80 for ln in lines)
    assert lines[0].startswith("image") and "caption" in lines[0]
    assert lines[2].startswith("m13.fits ")  # left-aligned
    assert "0.1235" in text and "0.123456789" not in text
    words = [w for w in " ".join(ln[lines[0].index("caption"):] for ln in lines[2:]).split()
             if w not in ("0.1235", "12.5")]
    assert " ".join(caption.split()) in " ".join(words)  # every word, in order, across the wrapped lines
    assert len(lines) > 6


def test_files_keep_full_precision(tmp_path, capsys):
    from astrovl.cli._common import emit

    table = Table({"name": ["a"], "value": [5.997063636779785]})
    emit(table, argparse.Namespace(output=str(tmp_path / "t.ecsv"), format="table"))
    printed = capsys.readouterr().out
    assert "5.997\n" in printed and "5.99706" not in printed
    assert Table.read(tmp_path / "t.ecsv")["value"][0] == 5.997063636779785


def test_galaxy10_summary_rows_in_label_order_and_title_fits():
    from astrovl.evaluation import DescriptionEvaluator
    from astrovl.evaluation.descriptions import GALAXY10_CLASS_NAMES, _fitting_title

    order = [7, 2, 9, 0, 5]
    n = len(order)
    table = Table({"label": [GALAXY10_CLASS_NAMES[i] for i in order], "semantic_score": np.linspace(0, 1, n),
                   "feature_score": np.zeros(n), "class_mentioned": np.zeros(n), "confidence_score": np.zeros(n),
                   "composite_score": np.zeros(n), "nearest_class": [GALAXY10_CLASS_NAMES[i] for i in order]})
    summary = DescriptionEvaluator.summarize(table)
    assert list(summary["label"]) == [GALAXY10_CLASS_NAMES[i] for i in sorted(order)] + ["all"]
    long_title = "Galaxy10 description scores (/home/astronomer/runs/astrollava-stage2-lora-merged/checkpoint-2000)"
    lines = _fitting_title(long_title, 8.5).splitlines()
    assert len(lines) >= 2 and all(len(ln) <= 8.5 * 11 for ln in lines)
    assert "".join(lines).replace(" ", "") == long_title.replace(" ", "")


def test_galaxy10_plot_title_stays_inside_the_figure():
    from astrovl.evaluation import DescriptionEvaluator
    from astrovl.evaluation.descriptions import GALAXY10_CLASS_NAMES

    table = Table({"label": list(GALAXY10_CLASS_NAMES[:2]), "semantic_score": [0.5, 0.6],
                   "feature_score": [0.1, 0.2], "class_mentioned": [0.0, 1.0], "confidence_score": [0.1, 0.1],
                   "composite_score": [0.3, 0.4], "nearest_class": list(GALAXY10_CLASS_NAMES[:2])},
                  meta={"model": "/home/astronomer/runs/astrollava-stage2-lora-merged/checkpoint-2000"})
    fig = DescriptionEvaluator().plot_summary(table)
    fig.canvas.draw()
    title = fig.axes[0].title.get_window_extent()
    assert title.x0 >= 0 and title.x1 <= fig.bbox.width


# ---------------------------------------------------------------------- outreach counters
def test_outreach_report_counts_local_copies_as_converted(tmp_path, m13_path, acs_path, capsys):
    pictures = tmp_path / "pictures"
    pictures.mkdir()
    shutil.copy(m13_path, pictures / "m13.fits")
    shutil.copy(acs_path, pictures / "acs.fits")
    records = tmp_path / "r.csv"
    Table({"image": [str(pictures / "m13.fits"), str(pictures / "acs.fits")], "caption": ["A globular cluster.", "Two detector chips."]}
          ).write(records, format="ascii.csv")
    argv = ["build-outreach", str(tmp_path / "ds"), str(records), "--image-root", str(pictures), "--image-size", "32"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "downloaded  0" in out and "converted   1" in out and "failed      1" in out
    assert "--hdu SCI,1" in out and "hdu=" not in out  # the report suggests the flag
    assert main([*argv, "--hdu", "SCI,1"]) == 0  # the acs record now converts, m13 has no SCI
    out = capsys.readouterr().out
    assert "skipped     1" in out and "converted   1" in out  # m13 was done; it has no SCI HDU anyway
