"""Every example in the ``--help`` texts of the CLIP and dataset commands runs, as written.

The examples name models and files; a workspace holds them under those names: tiny
models in a temporary Hugging Face hub cache (``openai/clip-vit-base-patch16``,
``mistralai/Mixtral-8x7B-Instruct-v0.1``) and in local directories, real telescope
images, a proposal-abstract catalog and MAST answered from astroquery's recorded
responses (the MAST boundary is the only thing replaced). The examples of one
command run in the order of the help text, the commands in the order a user would
run them, in one shared directory.
"""

from __future__ import annotations

import argparse
import glob
import json
import shlex
import shutil

import numpy as np
import pytest
import torch

from astrovl.cli import build_parser, main

#: commands whose examples are tested elsewhere (the LLaVA commands and their evaluation)
ELSEWHERE = {"caption", "ask", "convert-llava", "train-llava", "serve"}
ELSEWHERE_PREFIXES = ("astrovl evaluate galaxy10",)
#: commands in the order a user runs them; their examples build on each other
ORDER = ("synth", "build-hubble", "build-outreach", "summarize", "conversations", "train-clip",
         "embed", "index", "search", "classify", "evaluate", "demo")


def help_examples() -> dict[str, list[str]]:
    """``{top-level command: [example lines]}`` from every parser's epilog (sub-actions included)."""
    out: dict[str, list[str]] = {}

    def walk(parser, top):
        lines = (parser.epilog or "").split("examples:", 1)[-1].splitlines() if parser.epilog else []
        for line in lines:
            line = line.strip()
            if line.startswith("astrovl ") and line not in out.setdefault(top, []):
                out[top].append(line)
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    walk(sub, top or name)

    walk(build_parser(), None)
    return {k: v for k, v in out.items() if k is not None}


def test_every_command_with_examples_is_run_here():
    examples = help_examples()
    assert set(examples) - ELSEWHERE == set(ORDER)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, m13_path, ngc1316_path, acs_path, xdf_array):
    import huggingface_hub.constants
    import test_generation as tg
    import test_hubble_builder as th
    from astroquery import mast
    from PIL import Image

    from astrovl import load_image
    from astrovl.clip import TINY_CLIP_CONFIG, CLIPEmbedder
    from astrovl.testing import write_hub_snapshot
    from astrovl.testing.clip import make_tiny_transformers_clip

    root = tmp_path_factory.mktemp("examples")
    work, cache, build = root / "work", root / "hub-cache", root / "build"
    for d in (work, cache, build):
        d.mkdir()
    mp = pytest.MonkeyPatch()
    mp.setenv("HF_HUB_CACHE", str(cache))
    mp.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    mp.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    import transformers.utils.hub as transformers_hub

    if hasattr(transformers_hub, "TRANSFORMERS_CACHE"):  # transformers 4.x reads the cache once, at import
        mp.setattr(transformers_hub, "TRANSFORMERS_CACHE", str(cache))
    mp.chdir(work)

    # models under the names the examples use
    write_hub_snapshot(cache, "openai/clip-vit-base-patch16", make_tiny_transformers_clip(build / "clip", seed=2))
    tok = tg._train_tokenizer(tg.SENTENCES)
    tg._tiny_llama(len(tok)).save_pretrained(build / "llm")
    tok.save_pretrained(build / "llm")
    write_hub_snapshot(cache, "mistralai/Mixtral-8x7B-Instruct-v0.1", build / "llm")
    shutil.copytree(build / "llm", work / "llm")
    CLIPEmbedder.from_config(TINY_CLIP_CONFIG, seed=0).save_pretrained(work / "my-clip")
    CLIPEmbedder.from_config(TINY_CLIP_CONFIG, seed=9).save_pretrained(work / "runs" / "shuffled" / "best")

    # images and text files
    shutil.copy(m13_path, work / "m13.fits")
    shutil.copy(ngc1316_path, work / "ngc1316.fits")
    for folder, sources in (("previews", (m13_path, ngc1316_path)), ("more-previews", (m13_path,))):
        (work / folder).mkdir()
        for i, src in enumerate(sources):
            load_image(src).to_pil("L").save(work / folder / f"p{i}.png")
    (work / "more-previews" / "xdf.png").parent.mkdir(exist_ok=True)
    Image.fromarray(np.ascontiguousarray(xdf_array[::4, ::4])).save(work / "more-previews" / "xdf.png")
    (work / "abstracts.txt").write_text(th.ABSTRACTS)
    (work / "my_categories.txt").write_text("globular cluster\nspiral galaxy\n# a comment\nnebula\n")
    pictures = work / "pictures"  # the --image-root of the example: local images must lie under it
    pictures.mkdir()
    recs = []
    for i, src in enumerate((m13_path, ngc1316_path, m13_path, ngc1316_path)):
        path = pictures / f"outreach{i}.png"
        load_image(src).to_pil("L").save(path)
        recs.append({"image": str(path), "caption": f"A telescope image, number {i}.", "id": f"r{i}",
                     "title": f"Image {i}"})
    (work / "apod.json").write_text(json.dumps(recs[:2]))
    (work / "acs").mkdir()
    shutil.copy(acs_path, work / "acs" / "j94f05bgq_flt.fits")  # two SCI chips: examples choose one with --hdu
    (work / "raw").mkdir()
    shutil.copy(acs_path, work / "raw" / "j94f05bgq_flt.fits")
    (work / "acs.csv").write_text('image,caption\nraw/j94f05bgq_flt.fits,"A crowded field of stars, one ACS chip."\n')
    (work / "eso.jsonl").write_text("\n".join(json.dumps(r) for r in recs[2:]) + "\n")
    # embedding files of the index build-vectors examples (the tiny CLIP's 64 dimensions)
    vecs = np.random.default_rng(0).standard_normal((6000, 64)).astype(np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    np.save(work / "part-000.npy", vecs[:3000])
    np.save(work / "part-001.npy", vecs[3000:])
    np.save(work / "emb.npy", vecs[:50])

    # MAST: the recorded observations, previews made from real images
    caom = th.mast_json_table(th.MAST_DATA / "caom.json")
    caom = caom[caom["obs_collection"] == "HST"]
    caom.write(work / "obs.ecsv", format="ascii.ecsv")
    fake = th.FakeMast()
    xdf = Image.fromarray(np.ascontiguousarray(xdf_array[::6, ::6]))
    th.populate_caom(fake, caom, {
        "m13.jpg": th._encode(load_image(m13_path).to_pil("L"), "JPEG"),
        "ngc1316.png": th._encode(load_image(ngc1316_path).to_pil("L"), "PNG"),
        "xdf.jpg": th._encode(xdf, "JPEG"), "xdf.gif": th._encode(xdf.convert("P"), "GIF")})
    mp.setattr(mast.Observations, "get_product_list", fake.get_product_list)
    mp.setattr(mast.Observations, "download_file", fake.download_file)
    mp.setattr(mast.Observations, "query_criteria",
               lambda **kw: caom[[str(p) in set(kw["proposal_id"]) for p in caom["proposal_id"]]])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield work
    torch.set_num_threads(threads)
    mp.undo()


def run_example(line: str) -> int:
    argv = []
    for token in shlex.split(line)[1:]:
        argv.extend(sorted(glob.glob(token)) if "*" in token else [token])
    return main(argv)


def _examples(command):
    return [e for e in help_examples()[command] if not e.startswith(ELSEWHERE_PREFIXES)]


@pytest.mark.parametrize("command", ORDER)
def test_help_examples_run(command, workspace, capsys):
    out = {}
    for line in _examples(command):
        if "--device cuda" in line and not torch.cuda.is_available():
            continue  # run by test_cuda_help_examples_run on a GPU machine
        rc = run_example(line)
        captured = capsys.readouterr()
        assert rc == 0, f"{line}\n{captured.err[-2000:]}"
        out[line] = captured.out
    checks = {
        "synth": lambda: (workspace / "sky" / "manifest.ecsv").is_file(),
        "build-hubble": lambda: (workspace / "hst" / "manifest.ecsv").is_file(),
        "build-outreach": lambda: (workspace / "outreach" / "manifest.ecsv").is_file()
        and "converted   1" in out["astrovl build-outreach ./acs-outreach acs.csv --image-root ./raw --hdu SCI,1"],
        "summarize": lambda: (workspace / "summaries.ecsv").is_file(),
        "conversations": lambda: (workspace / "outreach" / "conversations.json").is_file()
        and len(json.loads((workspace / "outreach" / "trial.json").read_text())) <= 2,
        "train-clip": lambda: all((workspace / "runs" / r / "best").is_dir() for r in ("clip", "abstracts", "tiny")),
        "embed": lambda: np.load(workspace / "embeddings.npy").shape == (2, 64),
        "index": lambda: (workspace / "hst-index" / "index.json").is_file() and (workspace / "big").is_dir()
        and (workspace / "small" / "index.json").is_file() and (workspace / "archive" / "index.json").is_file(),
        "search": lambda: (workspace / "hits.ecsv").is_file(),
        # three ranked rows for m13; a categories file's three entries are the candidates, its comment is not
        "classify": lambda: [
            (sum("m13.fits" in row for row in text.splitlines()),
             all(c in text for c in ("globular cluster", "spiral galaxy", "nebula")), "comment" in text)
            for line, text in out.items()] == [(3, False, False), (3, True, False)],
        "evaluate": lambda: (workspace / "curves.png").is_file(),
        "demo": lambda: (workspace / "astrovl-demo" / "report.html").is_file(),
    }
    assert checks[command]()


@pytest.mark.cuda
def test_cuda_help_examples_run(workspace, capsys):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    for command in ORDER:
        for line in _examples(command):
            if "--device cuda" in line:
                assert run_example(line) == 0, line
