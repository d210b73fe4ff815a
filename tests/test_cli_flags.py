"""Every flag of the CLIP and dataset commands does what its help says (one test each).

Flags that only hand a value to the library are checked where the value arrives
(the library call is recorded); flags with logic of their own in the command line
are checked by their effect on files and tables. ``test_every_flag_has_a_test``
keeps this list complete.
"""

from __future__ import annotations

import argparse
import json
from types import SimpleNamespace

import numpy as np
import pytest
from astropy.io import fits
from astropy.table import Table

from astrovl.cli import build_parser, main
from astrovl.clip import TINY_CLIP_CONFIG, CLIPEmbedder, EmbeddingIndex

#: commands whose flags are tested elsewhere (LLaVA commands; evaluate galaxy10's own flags)
ELSEWHERE = {"caption", "ask", "convert-llava", "train-llava", "serve"}
GALAXY10_ONLY = {"--max-new-tokens", "--batch-size", "--references", "--revision"}  # tests/test_llava_cli.py


def _flags(parser, path=()):
    out = {}
    for a in parser._actions:
        if isinstance(a, argparse._SubParsersAction):
            for name, sub in a.choices.items():
                out.update(_flags(sub, (*path, name)))
        elif a.option_strings and not isinstance(a, argparse._HelpAction) and path:
            out.setdefault(" ".join(path), set()).add(a.option_strings[0])
    return out


TESTED: dict[str, set[str]] = {}


def covers(command: str, *flags: str):
    """Register the flags a test checks."""
    TESTED.setdefault(command, set()).update(flags)

    def deco(fn):
        return fn
    return deco


class Recorder:
    """Stands in for a library callable; remembers its arguments."""

    def __init__(self, result=None):
        self.calls: list[tuple[tuple, dict]] = []
        self.result = result

    def __call__(self, *args, **kwargs):
        self.calls.append((args, kwargs))
        return self.result

    @property
    def kwargs(self) -> dict:
        return self.calls[-1][1]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("clip") / "tiny"
    CLIPEmbedder.from_config(TINY_CLIP_CONFIG, seed=0).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def sky(tmp_path_factory):
    from astrovl.datasets import SyntheticSkyDataset

    return SyntheticSkyDataset.generate(tmp_path_factory.mktemp("sky"), n_images=120, image_size=64, seed=0,
                                        val_fraction=0.25, progress=False)


@pytest.fixture
def spy_from_pretrained(monkeypatch, tiny_dir):
    """CLIPEmbedder.from_pretrained records its arguments and returns the tiny model."""
    rec = Recorder()
    real = CLIPEmbedder.from_pretrained.__func__

    def fake(cls, *args, **kwargs):
        rec(*args, **kwargs)
        return real(cls, tiny_dir)

    monkeypatch.setattr(CLIPEmbedder, "from_pretrained", classmethod(fake))
    return rec


@pytest.fixture
def two_hdu_file(tmp_path):
    """A FITS file with two different image extensions."""
    rng = np.random.default_rng(0)
    a = np.zeros((80, 80))
    a[30:50, 30:50] = 10.0
    b = rng.normal(size=(80, 80))
    path = tmp_path / "two.fits"
    fits.HDUList([fits.PrimaryHDU(), fits.ImageHDU(a, name="FLAT"), fits.ImageHDU(b, name="NOISE")]).writeto(path)
    return path, a, b


def test_every_flag_has_a_test():
    flags = {c: f for c, f in _flags(build_parser()).items() if c.split()[0] not in ELSEWHERE}
    flags["evaluate"] -= GALAXY10_ONLY
    missing = {c: sorted(f - TESTED.get(c, set())) for c, f in flags.items() if f - TESTED.get(c, set())}
    assert not missing
    assert {c: sorted(f - flags.get(c, set())) for c, f in TESTED.items() if f - flags.get(c, set())} == {}


# ---------------------------------------------------------------------- embed
@covers("embed", "--hdu")
def test_embed_hdu(tmp_path, tiny_dir, two_hdu_file):
    path, a, b = two_hdu_file
    emb = CLIPEmbedder.from_pretrained(tiny_dir)
    argv = ["embed", str(path), "--model", str(tiny_dir), "--save", str(tmp_path / "v.npy")]
    assert main(argv) == 1  # two candidate images: the file needs --hdu
    for hdu, data in (("1", a), ("2", b), ("NOISE", b)):
        assert main(argv + ["--hdu", hdu]) == 0
        np.testing.assert_allclose(np.load(tmp_path / "v.npy"), emb.embed_images(data, progress=False), atol=1e-5)


@covers("embed", "--batch-size", "--model", "--pretrained", "--device")
def test_embed_model_flags_reach_the_loader(tmp_path, m13_path, spy_from_pretrained, monkeypatch):
    batches = Recorder()
    real = CLIPEmbedder.embed_images
    monkeypatch.setattr(CLIPEmbedder, "embed_images",
                        lambda self, images, **kw: batches(**kw) or real(self, images, **kw))
    assert main(["embed", str(m13_path), "--model", "ViT-B-16", "--pretrained", "openai",
                 "--device", "cpu", "--batch-size", "7"]) == 0
    args, kwargs = spy_from_pretrained.calls[-1]
    assert args == ("ViT-B-16", "openai") and kwargs["device"] == "cpu"
    assert batches.kwargs["batch_size"] == 7


@covers("embed", "--save", "--output", "--format")
def test_embed_outputs(tmp_path, tiny_dir, m13_path, ngc1316_path, capsys):
    save, table = tmp_path / "e.npy", tmp_path / "t.ecsv"
    assert main(["embed", str(m13_path), str(ngc1316_path), "--model", str(tiny_dir), "--save", str(save),
                 "--output", str(table), "--format", "json"]) == 0
    assert np.load(save).shape == (2, 64)
    assert list(Table.read(table)["image"]) == [str(m13_path), str(ngc1316_path)]
    assert json.loads(capsys.readouterr().out)[0]["dim"] == 64


# ---------------------------------------------------------------------- index
@covers("index build", "--index", "--approximate", "--batch-size", "--model", "--pretrained", "--device")
def test_index_build_flags(tmp_path, tiny_dir, m13_path, ngc1316_path, spy_from_pretrained):
    assert main(["index", "build", str(m13_path), str(ngc1316_path), "--index", str(tmp_path / "i"),
                 "--approximate", "hnsw", "--batch-size", "1", "--model", "ViT-B-16", "--pretrained", "openai",
                 "--device", "cpu"]) == 0
    manifest = json.loads((tmp_path / "i" / "index.json").read_text())
    assert manifest["kind"] == "hnsw" and manifest["count"] == 2 and (tmp_path / "i" / "index.faiss").is_file()
    assert spy_from_pretrained.calls[-1] == (("ViT-B-16", "openai"), {"device": "cpu"})


@covers("index add", "--index", "--batch-size", "--device")
def test_index_add_uses_the_recorded_model(tmp_path, tiny_dir, m13_path, ngc1316_path, monkeypatch):
    assert main(["index", "build", str(m13_path), "--index", str(tmp_path / "i"), "--model", str(tiny_dir)]) == 0
    batches = Recorder()
    real = CLIPEmbedder.embed_images
    monkeypatch.setattr(CLIPEmbedder, "embed_images",
                        lambda self, images, **kw: batches(device=str(self.device), **kw) or real(self, images, **kw))
    assert main(["index", "add", str(ngc1316_path), "--index", str(tmp_path / "i"), "--batch-size", "3",
                 "--device", "cpu"]) == 0
    assert batches.kwargs["batch_size"] == 3 and batches.kwargs["device"] == "cpu"
    assert len(EmbeddingIndex.load(tmp_path / "i")) == 2


@covers("index add", "--model", "--pretrained")
def test_index_add_model_is_checked(tmp_path, tiny_dir, m13_path, capsys):
    other = tmp_path / "other"
    CLIPEmbedder.from_config(TINY_CLIP_CONFIG, seed=4).save_pretrained(other)
    # an index of vectors whose model is unknown: --model names it
    index = EmbeddingIndex(64)
    index.add(np.ones((1, 64)), {"path": ["x"]})
    index.save(tmp_path / "bare")
    assert main(["index", "add", str(m13_path), "--index", str(tmp_path / "bare")]) == 1
    assert "pass --model" in capsys.readouterr().err
    assert main(["index", "add", str(m13_path), "--index", str(tmp_path / "bare"), "--model", str(other)]) == 0
    assert main(["index", "add", str(m13_path), "--index", str(tmp_path / "bare"), "--pretrained", "openai"]) == 1
    assert "needs --model" in capsys.readouterr().err


@covers("index build", "--vector-dtype", "--nlist", "--nprobe", "--pq-m", "--opq", "--rerank-depth")
def test_index_build_structure_flags(tmp_path, tiny_dir, sky, capsys):
    argv = ["index", "build", str(sky.root / "images"), "--model", str(tiny_dir), "--vector-dtype", "float16",
            "--nlist", "4", "--nprobe", "2", "--rerank-depth", "20"]
    assert main([*argv, "--index", str(tmp_path / "i"), "--approximate", "ivfpq", "--pq-m", "16", "--opq"]) == 0
    index = EmbeddingIndex.load(tmp_path / "i")
    p = index.params
    assert (p["nlist"], p["nprobe"], p["pq_m"], p["opq"], p["rerank_depth"]) == (4, 2, 16, True, 20)
    assert index.vectors.dtype == np.float16 and index.kind == "ivfpq"
    assert main([*argv, "--index", str(tmp_path / "j"), "--approximate", "ivf", "--pq-m", "8"]) == 1
    assert "options of --approximate ivfpq" in capsys.readouterr().err


@covers("index build", "--scheduler", "--shard-size")
def test_index_build_on_a_cluster_flags(tmp_path, tiny_dir, m13_path, ngc1316_path, monkeypatch):
    import contextlib

    import astrovl.clip.archive as archive
    from astrovl.cli import images as cli_images

    schedulers = Recorder()

    @contextlib.contextmanager
    def client(address):
        schedulers(address)
        yield "the client"

    def build(client, embedder, files, directory, **kw):
        calls(client, files, directory, **kw)
        EmbeddingIndex.build(embedder, files, metadata=kw["metadata"], progress=False).save(directory)

    calls = Recorder()
    monkeypatch.setattr(cli_images, "_dask_client", client)
    monkeypatch.setattr(archive, "build_on_cluster", build)
    assert main(["index", "build", str(m13_path), str(ngc1316_path), "--index", str(tmp_path / "i"),
                 "--model", str(tiny_dir), "--scheduler", "tcp://10.0.0.5:8786", "--shard-size", "7"]) == 0
    assert schedulers.calls[-1][0] == ("tcp://10.0.0.5:8786",)
    assert calls.calls[-1][0][0] == "the client" and calls.kwargs["shard_size"] == 7
    assert len(EmbeddingIndex.load(tmp_path / "i")) == 2


@covers("index build-vectors", "--index", "--approximate", "--vector-dtype", "--nlist", "--nprobe", "--pq-m",
        "--opq", "--rerank-depth", "--model", "--pretrained", "--device")
def test_index_build_vectors_flags(tmp_path, tiny_dir, spy_from_pretrained, capsys):
    rng = np.random.default_rng(0)
    np.save(tmp_path / "a.npy", rng.normal(size=(300, 64)).astype(np.float32))
    assert main(["index", "build-vectors", str(tmp_path / "a.npy"), "--index", str(tmp_path / "i"),
                 "--approximate", "ivfpq", "--vector-dtype", "float16", "--nlist", "3", "--nprobe", "2",
                 "--pq-m", "32", "--opq", "--rerank-depth", "9", "--model", "ViT-B-16", "--pretrained", "openai",
                 "--device", "cpu"]) == 0
    assert spy_from_pretrained.calls[-1] == (("ViT-B-16", "openai"), {"device": "cpu"})
    index = EmbeddingIndex.load(tmp_path / "i")
    p = index.params
    assert (p["nlist"], p["nprobe"], p["pq_m"], p["opq"], p["rerank_depth"]) == (3, 2, 32, True, 9)
    assert index.vectors.dtype == np.float16 and index.model_id is not None
    assert main(["index", "build-vectors", str(tmp_path / "a.npy"), "--index", str(tmp_path / "j"),
                 "--pretrained", "openai"]) == 1
    assert "needs --model" in capsys.readouterr().err


# ---------------------------------------------------------------------- search
@pytest.fixture(scope="module")
def ivf_index(tmp_path_factory, tiny_dir, sky):
    path = tmp_path_factory.mktemp("idx") / "ivf"
    assert main(["index", "build", str(sky.root / "images"), "--index", str(path), "--approximate", "ivf",
                 "--model", str(tiny_dir)]) == 0
    return path


@covers("search", "--image", "-k", "--output", "--format")
def test_search_image_k_and_outputs(tmp_path, ivf_index, sky, capsys):
    first = str(sky.image_path(0))
    capsys.readouterr()
    assert main(["search", str(ivf_index), "--image", first, "-k", "4", "--output", str(tmp_path / "h.csv"),
                 "--format", "csv"]) == 0
    hits = Table.read(tmp_path / "h.csv")
    assert len(hits) == 4 and hits["path"][0].endswith(sky.manifest["image"][0])
    assert capsys.readouterr().out.splitlines()[0].startswith("rank,score,row,path")


@covers("search", "--nprobe", "--ef-search")
def test_search_breadth(ivf_index, capsys):
    def rows(*extra):
        capsys.readouterr()
        assert main(["search", str(ivf_index), "a spiral galaxy", "-k", "90", "--format", "csv", *extra]) == 0
        return capsys.readouterr().out.strip().splitlines()[1:]

    narrow, wide = rows("--nprobe", "1"), rows("--nprobe", "64")
    index = EmbeddingIndex.load(ivf_index)
    scores = index.vectors @ index.embedder.embed_text("a spiral galaxy")[0]
    truth = np.argsort(-scores, kind="stable")[:90]
    assert sorted(int(r.split(",")[2]) for r in wide) == sorted(truth)  # all cells: the exact top 90
    assert narrow != wide
    assert main(["search", str(ivf_index), "x", "--ef-search", "8"]) == 1


@covers("search", "--rerank-depth")
def test_search_rerank_depth(tmp_path, tiny_dir, sky, ivf_index, capsys):
    path = tmp_path / "pq"
    assert main(["index", "build", str(sky.root / "images"), "--index", str(path), "--approximate", "ivfpq",
                 "--model", str(tiny_dir), "--nlist", "8", "--nprobe", "8"]) == 0

    def rows(*extra):
        capsys.readouterr()
        assert main(["search", str(path), "a spiral galaxy", "-k", "10", "--format", "csv", *extra]) == 0
        return [int(r.split(",")[2]) for r in capsys.readouterr().out.strip().splitlines()[1:]]

    index = EmbeddingIndex.load(path)
    truth = np.argsort(-(index.vectors @ index.embedder.embed_text("a spiral galaxy")[0]), kind="stable")[:10]
    assert sorted(rows("--rerank-depth", "120")) == sorted(truth)  # every vector re-scored: exact
    assert main(["search", str(ivf_index), "x", "--rerank-depth", "8"]) == 1
    assert "rerank_depth does not apply" in capsys.readouterr().err


@covers("search", "--model", "--pretrained", "--device")
def test_search_model_flags(ivf_index, tiny_dir, spy_from_pretrained, capsys):
    assert main(["search", str(ivf_index), "a nebula", "--model", str(tiny_dir), "--device", "cpu"]) == 0
    assert spy_from_pretrained.calls[-1] == ((str(tiny_dir), None), {"device": "cpu"})
    assert main(["search", str(ivf_index), "a nebula", "--model", "ViT-B-16", "--pretrained", "openai"]) == 0
    assert spy_from_pretrained.calls[-1][0] == ("ViT-B-16", "openai")


@covers("search", "--rerank", "--rerank-top")
def test_search_rerank_flags(ivf_index, monkeypatch, capsys):
    import astrovl.llava

    class Reranker:
        def rerank_scores(self, query, images):
            return -np.arange(len(images), dtype=float)[::-1]  # the last CLIP candidate first

    loads = Recorder(Reranker())
    monkeypatch.setattr(astrovl.llava.AstroLLaVA, "from_pretrained", loads)
    capsys.readouterr()
    assert main(["search", str(ivf_index), "a nebula", "-k", "3", "--rerank", "my-llava", "--rerank-top", "6",
                 "--nprobe", "64", "--device", "cpu", "--format", "csv"]) == 0
    assert loads.calls[-1] == (("my-llava",), {"device": "cpu"})
    rows = capsys.readouterr().out.strip().splitlines()
    assert rows[0].startswith("rank,rerank_score,score,clip_rank,row")
    assert [int(r.split(",")[3]) for r in rows[1:]] == [6, 5, 4]
    assert main(["search", str(ivf_index), "a nebula", "--rerank-top", "6"]) == 1
    assert "--rerank-top goes with --rerank" in capsys.readouterr().err
    assert main(["search", str(ivf_index), "--image", str(ivf_index.parent), "--rerank", "m"]) == 1
    assert "does not work with --image" in capsys.readouterr().err


# ---------------------------------------------------------------------- classify
@covers("classify", "--categories", "--top-k", "--output", "--format")
def test_classify_categories_and_top_k(tmp_path, tiny_dir, m13_path, capsys):
    cats = tmp_path / "c.txt"
    cats.write_text("alpha\nbeta\ngamma\n")
    capsys.readouterr()
    assert main(["classify", str(m13_path), "--model", str(tiny_dir), "--categories", str(cats), "--top-k", "2",
                 "--output", str(tmp_path / "z.ecsv"), "--format", "json"]) == 0
    table = Table.read(tmp_path / "z.ecsv")
    assert len(table) == 2 and set(table["category"]) <= {"alpha", "beta", "gamma"}
    assert len(json.loads(capsys.readouterr().out)) == 2


@covers("classify", "--model", "--pretrained", "--device")
def test_classify_model_flags(m13_path, spy_from_pretrained):
    assert main(["classify", str(m13_path), "--model", "ViT-B-16", "--pretrained", "openai", "--device", "cpu"]) == 0
    assert spy_from_pretrained.calls[-1] == (("ViT-B-16", "openai"), {"device": "cpu"})


# ---------------------------------------------------------------------- synth
@covers("synth", "--n-images", "--image-size", "--seed", "--val-fraction")
def test_synth_flags(monkeypatch):
    from astrovl.datasets import SyntheticSkyDataset

    rec = Recorder("dataset")
    monkeypatch.setattr(SyntheticSkyDataset, "generate", rec)
    assert main(["synth", "out", "--n-images", "12", "--image-size", "40", "--seed", "3", "--val-fraction", "0.5"]) == 0
    assert rec.calls[-1] == (("out",), {"n_images": 12, "image_size": 40, "seed": 3, "val_fraction": 0.5})


# ---------------------------------------------------------------------- build-hubble
class BuilderSpy:
    calls: list = []

    def __init__(self, *args, **kwargs):
        BuilderSpy.calls.append(("init", args, kwargs))
        self.report = "report"

    @classmethod
    def from_proposals(cls, ids, out, **kwargs):
        BuilderSpy.calls.append(("proposals", (ids, out), kwargs))
        return cls._bare()

    @classmethod
    def from_cycles(cls, cycles, out, **kwargs):
        BuilderSpy.calls.append(("cycles", (cycles, out), kwargs))
        return cls._bare()

    @classmethod
    def _bare(cls):
        obj = object.__new__(cls)
        obj.report = "report"
        return obj

    def build(self):
        return "dataset"


@pytest.fixture
def hubble_spy(monkeypatch, tmp_path):
    import astrovl.datasets

    monkeypatch.chdir(tmp_path)  # the abstracts files the commands name exist (they are checked first)
    for name in ("a.txt", "a"):
        (tmp_path / name).write_text("Proposal ID: 1\nAbstract:\nStars.\n")

    BuilderSpy.calls = []
    monkeypatch.setattr(astrovl.datasets, "HubblePreviewDatasetBuilder", BuilderSpy)
    summarizer = Recorder("summarizer")
    import astrovl.generation

    monkeypatch.setattr(astrovl.generation.AbstractSummarizer, "from_pretrained", summarizer)
    return SimpleNamespace(calls=BuilderSpy.calls, summarizer=summarizer)


@covers("build-hubble", "--proposal-id", "--cycle", "--observations")
def test_build_hubble_sources(tmp_path, hubble_spy):
    assert main(["build-hubble", "d", "--proposal-id", "1", "2", "--abstracts", "a.txt"]) == 0
    assert hubble_spy.calls[-1][:2] == ("proposals", (["1", "2"], "d"))
    assert main(["build-hubble", "d", "--cycle", "4", "--abstracts", "a.txt"]) == 0
    assert hubble_spy.calls[-1][:2] == ("cycles", ([4], "d"))
    Table({"obsid": ["1"]}).write(tmp_path / "o.ecsv")
    assert main(["build-hubble", "d", "--observations", str(tmp_path / "o.ecsv"), "--abstracts", "a.txt"]) == 0
    kind, (table, out), _ = hubble_spy.calls[-1]
    assert kind == "init" and list(table["obsid"]) == ["1"] and out == "d"


@covers("build-hubble", "--abstracts", "--caption-source", "--max-images-per-proposal", "--image-size",
        "--keep-color", "--seed", "--val-fraction")
def test_build_hubble_options_reach_the_builder(hubble_spy):
    assert main(["build-hubble", "d", "--proposal-id", "1", "--abstracts", "a.txt", "--caption-source", "title",
                 "--max-images-per-proposal", "5", "--image-size", "256", "--keep-color", "--seed", "9",
                 "--val-fraction", "0.3"]) == 0
    kw = hubble_spy.calls[-1][2]
    assert kw == dict(abstracts="a.txt", summarizer=None, caption_source="title", max_images_per_proposal=5,
                      image_size=256, seed=9, keep_color=True, val_fraction=0.3)
    # the former name of the flag still works
    assert main(["build-hubble", "d", "--proposal-id", "1", "--abstracts", "a.txt", "--caption-mode", "title"]) == 0
    assert hubble_spy.calls[-1][2]["caption_source"] == "title"


@covers("build-hubble", "--summarizer-model", "--gguf-file", "--device")
def test_build_hubble_summarizer_flags(hubble_spy, capsys):
    assert main(["build-hubble", "d", "--proposal-id", "1", "--abstracts", "a", "--summarizer-model", "m",
                 "--gguf-file", "m.gguf", "--device", "cpu"]) == 0
    assert hubble_spy.summarizer.calls[-1] == (("m",), {"gguf_file": "m.gguf", "device": "cpu"})
    assert hubble_spy.calls[-1][2]["summarizer"] == "summarizer"  # fills the summary columns
    for flag, value in (("--gguf-file", "m.gguf"), ("--device", "cpu")):
        assert main(["build-hubble", "d", "--proposal-id", "1", "--abstracts", "a", flag, value]) == 1
        assert "applies to the summarizer" in capsys.readouterr().err


def test_build_hubble_val_fraction_end_to_end(tmp_path, monkeypatch):
    """--val-fraction on a real build (MAST answered from recorded responses)."""
    import test_hubble_builder as th
    from astroquery import mast

    caom = th.mast_json_table(th.MAST_DATA / "caom.json")
    caom = caom[caom["obs_collection"] == "HST"]
    fake = th.FakeMast()
    from PIL import Image

    pic = th._encode(Image.new("L", (80, 60), 90), "PNG")
    th.populate_caom(fake, caom, {k: pic for k in ("m13.jpg", "ngc1316.png", "xdf.jpg", "xdf.gif")})
    monkeypatch.setattr(mast.Observations, "get_product_list", fake.get_product_list)
    monkeypatch.setattr(mast.Observations, "download_file", fake.download_file)
    caom.write(tmp_path / "obs.ecsv")
    (tmp_path / "abs.txt").write_text(th.ABSTRACTS)
    from astrovl.datasets import ManifestDataset
    from astrovl.datasets.hubble import assign_splits

    for fraction in ("0.0", "0.5"):
        out = tmp_path / f"hst{fraction}"
        assert main(["build-hubble", str(out), "--observations", str(tmp_path / "obs.ecsv"), "--abstracts",
                     str(tmp_path / "abs.txt"), "--image-size", "64", "--val-fraction", fraction]) == 0
        m = ManifestDataset(out).manifest
        expected = assign_splits({int(p) for p in m["proposal_id"]}, 0, float(fraction))
        assert [str(s) for s in m["split"]] == [expected[int(p)] for p in m["proposal_id"]]
        assert ("val" in set(m["split"])) == (fraction != "0.0")


# ---------------------------------------------------------------------- build-outreach
@covers("build-outreach", "--image-size", "--seed", "--val-fraction", "--image-root")
def test_build_outreach_flags(monkeypatch):
    import astrovl.datasets

    rec = Recorder(SimpleNamespace(build=lambda: "dataset", report="report"))
    monkeypatch.setattr(astrovl.datasets, "OutreachDatasetBuilder", rec)
    assert main(["build-outreach", "d", "a.json", "--image-size", "128", "--seed", "2", "--val-fraction", "0.4"]) == 0
    assert rec.calls[-1] == ((["a.json"], "d"), {"image_root": None, "image_size": 128, "seed": 2,
                                                 "val_fraction": 0.4, "hdu": None, "plane": None})
    assert main(["build-outreach", "d", "a.json", "--image-root", "pics"]) == 0
    assert rec.calls[-1][1]["image_root"] == "pics"


@covers("build-outreach", "--hdu", "--plane")
def test_build_outreach_hdu_and_plane(monkeypatch):
    import astrovl.datasets

    rec = Recorder(SimpleNamespace(build=lambda: "dataset", report="report"))
    monkeypatch.setattr(astrovl.datasets, "OutreachDatasetBuilder", rec)
    assert main(["build-outreach", "d", "a.json", "--hdu", "sci,2", "--plane", "1"]) == 0
    assert rec.kwargs["hdu"] == ("SCI", 2) and rec.kwargs["plane"] == 1


# ---------------------------------------------------------------------- summarize, conversations
@covers("summarize", "--model", "--gguf-file", "--device", "--output", "--format")
def test_summarize_flags(tmp_path, monkeypatch, capsys):
    import astrovl.generation

    def summarize_many(texts):
        return [SimpleNamespace(objects_and_phenomena=["stars"], science_use_cases=["ages"], caption="stars; ages")
                for _ in texts]

    rec = Recorder(SimpleNamespace(summarize_many=summarize_many))
    monkeypatch.setattr(astrovl.generation.AbstractSummarizer, "from_pretrained", rec)
    (tmp_path / "a.txt").write_text("We observe old stars in a cluster.")
    assert main(["summarize", str(tmp_path / "a.txt"), "--model", "m", "--gguf-file", "f.gguf", "--device", "cpu",
                 "--output", str(tmp_path / "s.csv"), "--format", "json"]) == 0
    assert rec.calls[-1] == (("m",), {"gguf_file": "f.gguf", "device": "cpu"})
    assert list(Table.read(tmp_path / "s.csv")["caption"]) == ["stars; ages"]
    assert json.loads(capsys.readouterr().out)[0]["caption"] == "stars; ages"


@covers("conversations", "--output", "--model", "--gguf-file", "--device", "--max-new-tokens", "--limit",
        "--max-retries", "--batch-size")
def test_conversations_flags(sky, tmp_path, monkeypatch):
    import astrovl.generation
    from astrovl.generation.guided import GenerationReport

    written = Recorder(tmp_path / "c.json")
    rec = Recorder(SimpleNamespace(generate_for_dataset=written, report=GenerationReport()))
    monkeypatch.setattr(astrovl.generation.ConversationGenerator, "from_pretrained", rec)
    assert main(["conversations", str(sky.root), "--output", str(tmp_path / "c.json"), "--model", "m",
                 "--gguf-file", "f.gguf", "--device", "cpu"]) == 0
    assert rec.calls[-1] == (("m",), {"gguf_file": "f.gguf", "device": "cpu", "max_new_tokens": None,
                                      "max_retries": 3})
    assert written.calls[-1][0][1] == str(tmp_path / "c.json")
    assert written.kwargs == {"limit": None, "batch_size": 1}
    assert main(["conversations", str(sky.root), "-o", str(tmp_path / "c.json"), "--max-new-tokens", "300",
                 "--limit", "2", "--max-retries", "0", "--batch-size", "4"]) == 0
    assert rec.kwargs["max_new_tokens"] == 300 and rec.kwargs["max_retries"] == 0
    assert written.kwargs == {"limit": 2, "batch_size": 4}


# ---------------------------------------------------------------------- train-clip
@pytest.fixture
def train_spy(monkeypatch, tiny_dir):
    import astrovl.training

    rec = Recorder(SimpleNamespace(history=Table({"step": [1]}), best_path="best"))
    monkeypatch.setattr(astrovl.training, "train_clip", rec)
    return rec


@covers("train-clip", "--output", "--mode", "--steps", "--batch-size", "--grad-accum", "--lr", "--warmup-steps",
        "--eval-every", "--best-metric", "--max-val", "--caption-mode", "--image-cache", "--seed", "--resume")
def test_train_clip_settings_reach_the_config(sky, tiny_dir, train_spy):
    assert main(["train-clip", str(sky.root), "--model", str(tiny_dir), "--output", "runs/x", "--mode", "head",
                 "--steps", "7", "--batch-size", "8", "--grad-accum", "2", "--lr", "0.002", "--warmup-steps", "3",
                 "--eval-every", "5", "--best-metric", "val_top10", "--max-val", "20", "--caption-mode", "abstract",
                 "--image-cache", "disk", "--seed", "6", "--resume"]) == 0
    (emb, train, val, config), _ = train_spy.calls[-1]
    assert (config.output_dir, config.mode, config.steps, config.batch_size, config.grad_accum, config.lr,
            config.warmup_steps, config.eval_every, config.best_metric, config.max_val, config.caption_mode,
            config.image_cache, config.seed, config.resume) == (
        "runs/x", "head", 7, 8, 2, 0.002, 3, 5, "val_top10", 20, "abstract", "disk", 6, True)
    assert len(train) + len(val) == len(sky)


@covers("train-clip", "--model", "--pretrained", "--device")
def test_train_clip_model_flags(sky, train_spy, spy_from_pretrained, capsys):
    assert main(["train-clip", str(sky.root), "--output", "o", "--model", "ViT-B-16", "--pretrained", "openai",
                 "--device", "cpu"]) == 0
    assert spy_from_pretrained.calls[-1] == (("ViT-B-16", "openai"), {"device": "cpu"})
    assert train_spy.calls[-1][0][3].device == "cpu"
    assert main(["train-clip", str(sky.root), "--output", "o", "--mode", "scratch", "--model", "tiny"]) == 0
    assert train_spy.calls[-1][0][0].embed_dim == 64
    assert main(["train-clip", str(sky.root), "--output", "o", "--mode", "scratch", "--model", "ViT-B-16",
                 "--pretrained", "openai"]) == 1
    assert "has no effect with --mode scratch" in capsys.readouterr().err


def test_train_clip_best_metric_picks_the_checkpoint(sky, tiny_dir, tmp_path):
    """--best-metric and --max-val on a real run: best/ is the step with the best chosen metric."""
    out = tmp_path / "run"
    assert main(["train-clip", str(sky.root), "--model", "tiny", "--mode", "scratch", "--steps", "6",
                 "--eval-every", "2", "--batch-size", "16", "--best-metric", "val_top10", "--max-val", "12",
                 "--output", str(out)]) == 0
    history = Table.read(out / "metrics.csv")
    best = CLIPEmbedder.from_pretrained(out / "best")
    from astrovl.evaluation import top_k_percent_accuracy
    from astrovl.training.clip import CLIPTrainingConfig, _validation_subset

    val = _validation_subset(sky.split("val"), CLIPTrainingConfig(max_val=12, seed=0))
    acc = top_k_percent_accuracy(best.embed_images(val, progress=False), best.embed_text(val.captions), 10)
    assert len(val) == 12 and acc == pytest.approx(max(history["val_top10"]), abs=1e-6)


@covers("train-clip", "--overwrite")
def test_train_clip_overwrite_and_resume_choose_how_a_run_starts(sky, tiny_dir, tmp_path, capsys):
    out = tmp_path / "run"
    cli = ["train-clip", str(sky.root), "--model", "tiny", "--mode", "scratch", "--steps", "2", "--eval-every", "1",
           "--batch-size", "16", "--max-val", "12", "--output", str(out)]
    assert main([*cli, "--steps", "4"]) == 0
    capsys.readouterr()
    assert main(cli) == 1  # the folder holds the finished run's checkpoint
    assert "pass --resume to continue from step 4, or --overwrite to start again" in capsys.readouterr().err
    assert main([*cli, "--resume"]) == 0
    assert "had already finished at step 4; nothing was trained" in capsys.readouterr().out
    assert main([*cli, "--overwrite"]) == 0
    assert list(Table.read(out / "metrics.csv")["step"]) == [1, 2]
    with pytest.raises(SystemExit):
        main([*cli, "--resume", "--overwrite"])


# ---------------------------------------------------------------------- evaluate retrieval
@covers("evaluate", "--split", "--k-percent", "--limit", "--seed", "--plot", "--output", "--format")
def test_evaluate_retrieval_options(sky, tiny_dir, tmp_path, capsys):
    def run(*extra):
        capsys.readouterr()
        assert main(["evaluate", "retrieval", str(sky.root), "--model", str(tiny_dir), "--format", "json",
                     *extra]) == 0
        return json.loads(capsys.readouterr().out)

    full = run()
    assert full[0]["n"] == len(sky.split("val")) and full[0]["k_percent"] == 10.0
    assert run("--split", "train")[0]["n"] == len(sky.split("train"))
    assert run("--k-percent", "50")[0]["random"] == 0.5
    a, b, c = run("--limit", "10", "--seed", "1"), run("--limit", "10", "--seed", "1"), run("--limit", "10", "--seed", "2")
    assert a == b and a[0]["n"] == 10 and a != c  # a random subset, fixed by the seed
    assert run("--plot", str(tmp_path / "p.png"), "--output", str(tmp_path / "r.ecsv"))
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG" and len(Table.read(tmp_path / "r.ecsv")) == 1


@covers("evaluate", "--model", "--pretrained", "--device", "--base-model", "--base-pretrained", "--control")
def test_evaluate_retrieval_reports_base_and_control(sky, tiny_dir, tmp_path, capsys, spy_from_pretrained):
    assert main(["evaluate", "retrieval", str(sky.root), "--model", "ViT-B-16", "--pretrained", "openai",
                 "--device", "cpu", "--base-model", "ViT-B-32", "--base-pretrained", "laion2b_s34b_b79k",
                 "--control", str(tiny_dir), "--format", "json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["role"] for r in rows] == ["model", "base", "shuffled control"]
    calls = [c[0] for c in spy_from_pretrained.calls]
    assert calls == [("ViT-B-16", "openai"), ("ViT-B-32", "laion2b_s34b_b79k"), (str(tiny_dir),)]
    assert all(c[1]["device"] == "cpu" for c in spy_from_pretrained.calls)
    assert main(["evaluate", "retrieval", str(sky.root), "--base-pretrained", "x"]) == 1
    assert main(["evaluate", "galaxy10", "x.h5", "--control", "c"]) == 1
    assert "applies to 'evaluate retrieval'" in capsys.readouterr().err


@pytest.mark.parametrize("flag, value", [("--max-new-tokens", "5"), ("--references", "astrovl"),
                                         ("--batch-size", "2"), ("--revision", "main")])
def test_evaluate_retrieval_refuses_galaxy10_flags(sky, flag, value, capsys):
    assert main(["evaluate", "retrieval", str(sky.root), flag, value]) == 1
    assert f"{flag} applies to 'evaluate galaxy10'" in capsys.readouterr().err


# ---------------------------------------------------------------------- demo
@covers("demo", "--output", "--steps", "--seed", "--n-images", "--quick", "--model", "--pretrained", "--device",
        "--skip-llava")
def test_demo_flags(monkeypatch, capsys):
    import astrovl.demo

    rec = Recorder(SimpleNamespace(summary=Table({"model": ["m"]}), report_path="r.html", search_command="s",
                                     serve_command="v", results_path="r.json", llava=None, llava_note="n"))
    monkeypatch.setattr(astrovl.demo, "run_demo", rec)
    assert main(["demo", "--output", "o", "--steps", "5", "--seed", "2", "--n-images", "40", "--quick",
                 "--model", "ViT-B-16", "--pretrained", "openai", "--device", "cpu"]) == 0
    assert rec.calls[-1] == (("o",), dict(steps=5, seed=2, device="cpu", model="ViT-B-16", pretrained="openai",
                                          n_images=40, quick=True, llava=True))
    assert "AstroLLaVA part skipped: n" in capsys.readouterr().out
    assert main(["demo", "--skip-llava"]) == 0
    assert rec.kwargs["llava"] is False
    assert "AstroLLaVA" not in capsys.readouterr().out
    monkeypatch.undo()
    assert main(["demo", "--output", "o", "--pretrained", "openai"]) == 1
    assert "needs model=" in capsys.readouterr().err


@pytest.mark.parametrize("via", ["file", "stdout"])
def test_csv_output_keeps_one_row_per_result(tmp_path, via, capsys):
    """Text holding line breaks other than "\\n" (a vertical tab, "\\r\\n", U+2028) stays in its row."""
    from astrovl.cli._common import emit

    table = Table({"image": ["m13.fits", "ngc1316.fits"],
                   "caption": ["a cluster\x0bof stars\r\nand more", "a galaxy\u2028with dust"]})
    out = tmp_path / "captions.csv"
    emit(table, SimpleNamespace(output=str(out) if via == "file" else None,
                                format="table" if via == "file" else "csv"))
    text = out.read_text("utf-8") if via == "file" else capsys.readouterr().out
    assert not any(c in text for c in "\x0b\r\u2028")
    back = Table.read(text, format="ascii.csv")
    assert list(back["image"]) == ["m13.fits", "ngc1316.fits"]
    assert list(back["caption"]) == ["a cluster\nof stars\nand more", "a galaxy\nwith dust"]
    assert table["caption"][0] == "a cluster\x0bof stars\r\nand more"  # the caller's table is unchanged


# ---------------------------------------------------------------------- --hdu, --plane, --on-error
@pytest.fixture
def cube_file(tmp_path):
    """A FITS cube of four different planes."""
    rng = np.random.default_rng(1)
    cube = rng.normal(size=(4, 48, 48)).astype(np.float32)
    path = tmp_path / "cube.fits"
    fits.PrimaryHDU(cube).writeto(path)
    return path, cube


@covers("embed", "--plane")
def test_embed_plane(tmp_path, tiny_dir, cube_file, capsys):
    path, cube = cube_file
    emb = CLIPEmbedder.from_pretrained(tiny_dir)
    argv = ["embed", str(path), "--model", str(tiny_dir), "--save", str(tmp_path / "v.npy")]
    assert main(argv) == 1  # four planes: the command asks for --plane
    assert "choose one with --plane" in capsys.readouterr().err
    assert main(argv + ["--plane", "2"]) == 0
    np.testing.assert_allclose(np.load(tmp_path / "v.npy"), emb.embed_images(cube[2], progress=False), atol=1e-5)


@covers("embed", "--on-error")
def test_embed_on_error(tmp_path, tiny_dir, m13_path, ngc1316_path, capsys):
    broken = tmp_path / "broken.fits"
    broken.write_bytes(b"SIMPLE  =                    T" + b" " * 50)
    argv = ["embed", str(m13_path), str(broken), str(ngc1316_path), "--model", str(tiny_dir),
            "--format", "csv", "--save", str(tmp_path / "v.npy")]
    capsys.readouterr()
    assert main(argv) == 2  # default: skip, report, go on
    out = capsys.readouterr()
    assert list(Table.read(out.out, format="ascii.csv")["image"]) == [str(m13_path), str(ngc1316_path)]
    assert np.load(tmp_path / "v.npy").shape == (2, 64)
    assert f"skipped {broken}" in out.err and "1 of 3 files could not be read" in out.err
    assert main(argv + ["--on-error", "stop"]) == 1
    out = capsys.readouterr()
    assert out.out == "" and str(broken) in out.err


@covers("index build", "--hdu", "--plane")
def test_index_build_hdu_and_plane(tmp_path, tiny_dir, two_hdu_file, cube_file):
    path, a, b = two_hdu_file
    emb = CLIPEmbedder.from_pretrained(tiny_dir)
    assert main(["index", "build", str(path), "--index", str(tmp_path / "i"), "--model", str(tiny_dir)]) == 1
    assert main(["index", "build", str(path), "--index", str(tmp_path / "i"), "--model", str(tiny_dir),
                 "--hdu", "NOISE"]) == 0
    index = EmbeddingIndex.load(tmp_path / "i")
    np.testing.assert_allclose(index.vectors, emb.embed_images(b, progress=False), atol=1e-5)
    assert list(index.metadata["hdu"]) == ["NOISE"]  # the index says what it read
    cube, data = cube_file
    assert main(["index", "build", str(cube), "--index", str(tmp_path / "c"), "--model", str(tiny_dir),
                 "--plane", "3"]) == 0
    index = EmbeddingIndex.load(tmp_path / "c")
    np.testing.assert_allclose(index.vectors, emb.embed_images(data[3], progress=False), atol=1e-5)
    assert list(index.metadata["plane"]) == [3]


@covers("index add", "--hdu", "--plane")
def test_index_add_hdu_and_plane(tmp_path, tiny_dir, two_hdu_file, cube_file, m13_path):
    path, a, b = two_hdu_file
    cube, data = cube_file
    emb = CLIPEmbedder.from_pretrained(tiny_dir)
    assert main(["index", "build", str(m13_path), "--index", str(tmp_path / "i"), "--model", str(tiny_dir)]) == 0
    assert main(["index", "add", str(path), "--index", str(tmp_path / "i"), "--hdu", "1"]) == 0
    assert main(["index", "add", str(cube), "--index", str(tmp_path / "i"), "--plane", "0"]) == 0
    index = EmbeddingIndex.load(tmp_path / "i")
    np.testing.assert_allclose(index.vectors[1:], emb.embed_images([a, data[0]], progress=False), atol=1e-5)


@covers("search", "--hdu", "--plane")
def test_search_image_hdu_and_plane(tmp_path, tiny_dir, two_hdu_file, cube_file, capsys):
    path, a, b = two_hdu_file
    cube, data = cube_file
    index = EmbeddingIndex.build(CLIPEmbedder.from_pretrained(tiny_dir), [a, b, data[1]],
                                 metadata={"path": ["flat", "noise", "plane1"]}, progress=False)
    index.save(tmp_path / "i")
    for extra, best in ((["--image", str(path), "--hdu", "FLAT"], "flat"),
                        (["--image", str(path), "--hdu", "2"], "noise"),
                        (["--image", str(cube), "--plane", "1"], "plane1")):
        capsys.readouterr()
        assert main(["search", str(tmp_path / "i"), *extra, "-k", "1", "--format", "csv"]) == 0
        assert Table.read(capsys.readouterr().out, format="ascii.csv")["path"][0] == best
    assert main(["search", str(tmp_path / "i"), "a nebula", "--hdu", "1"]) == 1
    assert "give --image" in capsys.readouterr().err


@covers("classify", "--hdu", "--plane")
def test_classify_hdu_and_plane(tmp_path, tiny_dir, two_hdu_file, cube_file, capsys):
    path, a, b = two_hdu_file
    cube, data = cube_file
    emb = CLIPEmbedder.from_pretrained(tiny_dir)
    cats = tmp_path / "c.txt"
    cats.write_text("alpha\nbeta\ngamma\n")
    for extra, pixels in (([str(path), "--hdu", "NOISE"], b), ([str(cube), "--plane", "2"], data[2])):
        capsys.readouterr()
        assert main(["classify", *extra, "--model", str(tiny_dir), "--categories", str(cats), "--top-k", "3",
                     "--format", "json"]) == 0
        got = {r["category"]: r["score"] for r in json.loads(capsys.readouterr().out)}
        expected = emb.zero_shot(pixels, categories=["alpha", "beta", "gamma"], top_k=3)
        assert got == pytest.approx(dict(zip(expected["category"], expected["score"])), abs=1e-4)
