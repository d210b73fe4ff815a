"""The command line and the offline demo, end to end on small settings."""

from __future__ import annotations

import html
import re
import subprocess
import sys

import numpy as np
import pytest

from astrovl.cli import build_parser, main

SUBCOMMANDS = ("embed", "index", "search", "classify", "caption", "ask", "build-hubble", "build-outreach",
               "summarize", "conversations", "synth", "train-clip", "train-llava", "evaluate",
               "convert-llava", "serve", "demo")


@pytest.mark.parametrize("command", SUBCOMMANDS)
def test_every_subcommand_has_help_with_examples(command, capsys):
    with pytest.raises(SystemExit) as exc:
        main([command, "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert f"usage: astrovl {command}" in out
    assert "examples:" in out


def test_parser_lists_all_subcommands():
    text = build_parser().format_help()
    for command in SUBCOMMANDS:
        assert command in text


def test_bad_arguments_give_one_line_error_and_nonzero_exit(tmp_path):
    res = subprocess.run([sys.executable, "-m", "astrovl.cli", "search", str(tmp_path / "nope"), "galaxy"],
                         capture_output=True, text=True)
    assert res.returncode == 1
    lines = [ln for ln in res.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1
    assert lines[0].startswith("astrovl search: error:")
    assert "not an astrovl embedding index" in lines[0]
    res = subprocess.run([sys.executable, "-m", "astrovl.cli", "synth", str(tmp_path), "--n-images", "x"],
                         capture_output=True, text=True)
    assert res.returncode == 2
    assert "invalid int value" in res.stderr


@pytest.fixture(scope="module")
def tiny_clip_dir(tmp_path_factory):
    from astrovl.clip import TINY_CLIP_CONFIG, CLIPEmbedder

    path = tmp_path_factory.mktemp("clip") / "tiny"
    CLIPEmbedder.from_config(TINY_CLIP_CONFIG, seed=0).save_pretrained(path)
    return path


def test_cli_synth_index_search_classify(tmp_path, tiny_clip_dir, m13_path, capsys):
    sky = tmp_path / "sky"
    assert main(["synth", str(sky), "--n-images", "22", "--image-size", "64", "--seed", "3"]) == 0
    assert (sky / "manifest.ecsv").is_file()
    index = tmp_path / "index"
    assert main(["index", "build", str(sky / "images"), str(m13_path), "--index", str(index),
                 "--model", str(tiny_clip_dir)]) == 0
    capsys.readouterr()
    out_file = tmp_path / "hits.ecsv"
    assert main(["search", str(index), "globular cluster", "-k", "3", "--model", str(tiny_clip_dir),
                 "-o", str(out_file)]) == 0
    from astropy.table import Table

    hits = Table.read(out_file)
    assert len(hits) == 3
    assert list(hits["rank"]) == [1, 2, 3]
    assert np.all(np.diff(hits["score"]) <= 1e-6)
    assert main(["search", str(index), "--image", str(m13_path), "-k", "1", "--model", str(tiny_clip_dir),
                 "--format", "json"]) == 0
    out = capsys.readouterr().out
    assert str(m13_path) in out  # the image itself is its own best match
    cats = tmp_path / "cats.txt"
    cats.write_text("globular cluster\nspiral galaxy\n# comment\nnebula\n")
    assert main(["classify", str(m13_path), "--model", str(tiny_clip_dir), "--categories", str(cats),
                 "--top-k", "2", "--format", "csv"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].startswith("image,source,rank,category,score")
    assert len(out.strip().splitlines()) == 3


def test_cli_embed_saves_unit_vectors(tmp_path, tiny_clip_dir, m13_path, ngc1316_path, capsys):
    save = tmp_path / "emb.npy"
    assert main(["embed", str(m13_path), str(ngc1316_path), "--model", str(tiny_clip_dir),
                 "--save", str(save)]) == 0
    vec = np.load(save, allow_pickle=False)
    assert vec.shape == (2, 64)
    np.testing.assert_allclose(np.linalg.norm(vec, axis=1), 1.0, atol=1e-5)


def test_demo_quick_writes_escaped_report(tmp_path):
    from astrovl.demo import run_demo

    # the CLIP part (the AstroLLaVA part is tested in test_demo_llava.py)
    result = run_demo(tmp_path / "demo", quick=True, steps=150, n_images=330, progress=False, llava=False)
    text = result.report_path.read_text()
    import json

    results = json.loads(result.results_path.read_text())
    assert result.results_path == result.report_path.parent / "results.json"
    assert results["clip"]["model"] == "scratch" and results["control"]["model"] == "shuffled captions (control)"
    assert results["llava"] == results["rerank"] == {"skipped": "skipped (--skip-llava)"}
    assert result.llava is None and "The AstroLLaVA part did not run: skipped (--skip-llava)." in text
    assert text.count("data:image/png;base64,") >= 10  # thumbnails, curves
    acc = {row["model"]: row["top10_image_to_text"] for row in result.summary}
    trained = acc["scratch"]
    control = acc["shuffled captions (control)"]
    assert results["clip"]["top10_image_to_text"] == pytest.approx(trained)
    assert trained > 0.3, acc
    assert control < 0.25, acc
    # numbers in the report
    assert f"{trained:.4g}" in text
    # all embedded text is escaped: no raw tags other than ours, queries appear escaped
    assert "<script" not in text
    assert html.escape("query: barred spiral galaxy with prominent arms") in text
    assert re.search(r"M13 \(astropy test image\)", text)
    # the index remembers the trained model: the follow-up search the report shows works as is
    assert result.search_command == f"astrovl search {result.index_path} 'two merging galaxies'"
    assert html.escape(result.search_command) in text
    argv = result.search_command.split(" ", 2)[1:2] + [str(result.index_path), "two merging galaxies"]
    assert main(argv + ["-k", "3", "--format", "csv"]) == 0
    # and the serve command it prints puts it on the web, model and real images included
    assert result.serve_command == f"astrovl serve {result.index_path}"
    assert html.escape(result.serve_command) in text
    pytest.importorskip("starlette")
    from starlette.testclient import TestClient

    from astrovl.serve import create_app

    client = TestClient(create_app(result.index_path, thumbnail_cache=tmp_path / "thumbs"))
    hits = client.get("/api/search", params={"q": "dense globular star cluster", "k": 200,
                                             "filter": "kind:real"}).json()["results"]
    m13 = next(h for h in hits if h["label"].startswith("M13"))
    assert m13["metadata"]["path"] == "data/real/m13.fits" and m13["ra"] == pytest.approx(250.42, abs=0.05)
    assert client.get(m13["thumbnail"]).headers["content-type"] == "image/png"


def test_report_escapes_untrusted_text(tmp_path):
    from astrovl.reporting import HTMLReport

    rep = HTMLReport("<b>title</b>")
    rep.paragraph("<script>alert(1)</script>")
    rep.table([{"name": "<img src=x onerror=alert(1)>", "value": 0.5}])
    rep.image_grid([(np.zeros((4, 4)), "<i>cap</i>")])
    text = rep.write(tmp_path / "r.html").read_text()
    assert "<script>alert" not in text
    assert "<img src=x" not in text
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in text
    assert "&lt;i&gt;cap&lt;/i&gt;" in text


def test_cli_approximate_index_search_breadth(tmp_path, tiny_clip_dir, capsys):
    sky = tmp_path / "sky"
    assert main(["synth", str(sky), "--n-images", "60", "--image-size", "48", "--seed", "1"]) == 0
    index = tmp_path / "ivf-index"
    assert main(["index", "build", str(sky / "images"), "--index", str(index), "--approximate", "ivf",
                 "--model", str(tiny_clip_dir)]) == 0
    capsys.readouterr()
    assert main(["search", str(index), "a spiral galaxy", "-k", "60", "--nprobe", "2",
                 "--model", str(tiny_clip_dir), "--format", "csv"]) == 0
    rows = capsys.readouterr().out.strip().splitlines()
    assert rows[0].startswith("rank,score,row,path") and len(rows) == 61
    assert main(["search", str(index), "a spiral galaxy", "--ef-search", "64",
                 "--model", str(tiny_clip_dir)]) != 0
    assert "ef_search does not apply to an index of kind 'ivf'" in capsys.readouterr().err
