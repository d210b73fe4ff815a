"""The AstroLLaVA commands (caption, ask, convert-llava, train-llava, evaluate galaxy10): every --help example
runs, and every flag does what its help says. Tiny models stand under the released hub ids in a temporary,
offline hub cache."""

from __future__ import annotations

import glob
import json
import shlex
import shutil

import numpy as np
import pytest
from astropy.table import Table

from astrovl import AstroLLaVA, conf
from astrovl.cli import build_parser, main
from astrovl.llava import convert_llava_checkpoint
from astrovl.llava.hub import resolve_checkpoint
from astrovl.testing import write_hub_snapshot
from astrovl.testing.galaxy10 import make_tiny_galaxy10
from astrovl.testing.llava import make_tiny_hub

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def env(tmp_path_factory, m13_path, ngc1316_path, acs_path):
    """A working directory with the files the examples name, and a hub cache with the models they load."""
    import huggingface_hub.constants as hf_constants

    from astrovl.datasets import SyntheticSkyDataset
    from astrovl.generation import to_llava_record

    root = tmp_path_factory.mktemp("cli")
    cache = root / "hub"
    work = root / "work"
    work.mkdir()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(hf_constants, "HF_HUB_CACHE", str(cache))
        mp.setattr(hf_constants, "HF_HUB_OFFLINE", True)
        mp.setenv("HF_HUB_CACHE", str(cache))
        mp.setenv("HF_HUB_OFFLINE", "1")
        with conf.set_temp("cache_dir", str(root / "astrovl-cache")):
            make_tiny_hub(cache, root / "src")
            write_hub_snapshot(cache, "matthieulel/galaxy10_decals", make_tiny_galaxy10(root / "g10"),
                               repo_type="dataset")
            shutil.copy(m13_path, work / "m13.fits")
            shutil.copy(ngc1316_path, work / "ngc1316.fits")
            (work / "acs").mkdir()
            shutil.copy(acs_path, work / "acs" / "j94f05bgq_flt.fits")  # two SCI chips
            # what `astrovl convert-llava UniverseTBD/AstroLLaVA_v3 ./astrollava-hf` writes
            convert_llava_checkpoint("UniverseTBD/AstroLLaVA_v3", work / "astrollava-hf")
            sky = SyntheticSkyDataset.generate(work / "outreach", n_images=6, image_size=32,
                                               classes=["elliptical", "cigar"], seed=0, val_fraction=0.34)
            records = [to_llava_record(sky.manifest["id"][i], sky.manifest["image"][i],
                                       [{"question": "What is this?", "answer": f"Object {i}."}])
                       for i in range(len(sky))]
            (work / "conv.json").write_text(json.dumps(records))
            _write_h5(work / "Galaxy10_DECals.h5")
            yield {"work": work, "cache": cache, "sky": sky, "root": root}


def _write_h5(path, per_class=2):
    import h5py

    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(10), per_class)
    with h5py.File(path, "w") as f:
        f["images"] = rng.integers(0, 255, size=(len(labels), 24, 24, 3), dtype=np.uint8)
        f["ans"] = labels


def _run(argv, capsys):
    rc = main(["--debug", *argv])
    out = capsys.readouterr()
    assert rc == 0, out.err
    return out.out


@pytest.fixture
def in_work(env, monkeypatch):
    monkeypatch.chdir(env["work"])
    return env["work"]


def _examples(command):
    sub = next(a for a in build_parser()._subparsers._group_actions if a.dest == "command")
    epilog = sub.choices[command].epilog
    lines = [ln.strip() for ln in epilog.split("examples:", 1)[1].splitlines() if ln.strip()]
    return [ln for ln in lines if " retrieval " not in ln]


@pytest.mark.parametrize("command", ["caption", "ask", "convert-llava", "train-llava", "evaluate"])
def test_every_help_example_runs(command, in_work, capsys):
    from astropy.table import Table

    for line in _examples(command):
        argv = []
        for word in shlex.split(line)[1:]:
            argv.extend(sorted(glob.glob(word)) or [word])  # as the shell: a pattern without matches stays
        out = _run(argv, capsys)
        assert out.strip(), line
    # what the examples wrote
    if command == "caption":
        table = Table.read(in_work / "captions.csv", format="ascii.csv")
        assert list(table["image"]) == ["m13.fits", "ngc1316.fits"]
    elif command == "convert-llava":
        assert all((in_work / d / "config.json").is_file() for d in ("astrollava-hf", "llava-v1.5-hf"))
    elif command == "train-llava":
        assert (in_work / "runs" / "s1" / "model" / "config.json").is_file()
        assert (in_work / "runs" / "s2" / "adapter" / "adapter_config.json").is_file()
    elif command == "evaluate":
        table = Table.read(in_work / "galaxy10.ecsv")  # one row a class, then all 20 images
        assert len(table) == 11 and table["label"][-1] == "all" and table["n"][-1] == 20
        assert (in_work / "g10.png").is_file()


# ----------------------------------------------------------------------------- spies
class Spy:
    """Records the arguments of library calls made by the commands (the calls still run)."""

    def __init__(self, monkeypatch):
        self.calls: dict[str, list] = {}
        self.mp = monkeypatch

    def method(self, owner, name, kind="method"):
        original = getattr(owner, name)
        func = original.__func__ if kind == "classmethod" else original
        record = self.calls.setdefault(name, [])

        def wrapper(*args, **kwargs):
            record.append((args, kwargs))
            return func(*args, **kwargs)

        self.mp.setattr(owner, name, classmethod(wrapper) if kind == "classmethod" else wrapper)
        return self

    def last(self, name):
        return self.calls[name][-1]


@pytest.fixture
def spy(monkeypatch, in_work):
    s = Spy(monkeypatch)
    s.method(AstroLLaVA, "from_pretrained", "classmethod")
    s.method(AstroLLaVA, "caption")
    s.method(AstroLLaVA, "ask")
    return s


# ----------------------------------------------------------------------------- caption
def test_caption_images_and_directories(spy, capsys, in_work):
    (in_work / "imgs").mkdir(exist_ok=True)
    shutil.copy("m13.fits", in_work / "imgs" / "a.fits")
    shutil.copy("ngc1316.fits", in_work / "imgs" / "b.fits")
    out = _run(["caption", "m13.fits", "imgs", "--max-new-tokens", "3", "--format", "csv"], capsys)
    table = Table.read(out, format="ascii.csv")
    assert list(table["image"]) == ["m13.fits", "imgs/a.fits", "imgs/b.fits"]
    assert spy.last("caption")[0][1] == ["m13.fits", "imgs/a.fits", "imgs/b.fits"]


@pytest.mark.parametrize("flag, value, check", [
    ("--prompt", "List the stars.", lambda s: s.last("caption")[1]["prompt"] == "List the stars."),
    ("--max-new-tokens", "5", lambda s: s.last("caption")[1]["max_new_tokens"] == 5),
    ("--batch-size", "1", lambda s: s.last("caption")[1]["batch_size"] == 1),
    ("--model", "llava-hf/llava-1.5-7b-hf", lambda s: s.last("from_pretrained")[0][1] == "llava-hf/llava-1.5-7b-hf"),
    ("--device", "cpu", lambda s: s.last("from_pretrained")[1]["device"] == "cpu"),
])
def test_caption_flags(spy, capsys, flag, value, check):
    _run(["caption", "m13.fits", "--max-new-tokens", "3", flag, value], capsys)
    assert check(spy)


def test_caption_default_model_is_the_released_astrollava(spy, capsys):
    _run(["caption", "m13.fits", "--max-new-tokens", "2"], capsys)
    assert spy.last("from_pretrained")[0][1] == "UniverseTBD/AstroLLaVA_v3"


def test_caption_revision_pins_the_hub_revision(spy, capsys, env):
    rev = resolve_checkpoint("UniverseTBD/AstroLLaVA_v3").revision
    _run(["caption", "m13.fits", "--max-new-tokens", "2", "--revision", rev], capsys)
    assert spy.last("from_pretrained")[1]["revision"] == rev
    with pytest.raises(Exception, match="revision 'nope'"):
        main(["--debug", "caption", "m13.fits", "--revision", "nope"])


def test_caption_output_and_format(spy, capsys, tmp_path):
    out = _run(["caption", "m13.fits", "ngc1316.fits", "--max-new-tokens", "2", "-o", str(tmp_path / "c.ecsv"),
                "--format", "json"], capsys)
    assert [r["image"] for r in json.loads(out)] == ["m13.fits", "ngc1316.fits"]
    written = Table.read(tmp_path / "c.ecsv")
    assert list(written["caption"]) == [r["caption"] for r in json.loads(out)]


def test_caption_hdu_and_plane(spy, capsys, in_work, tmp_path):
    from astropy.io import fits

    from astrovl.imaging.inputs import ImageFile

    assert main(["caption", "acs/j94f05bgq_flt.fits", "--max-new-tokens", "2"]) == 1  # two SCI chips
    assert "choose one with --hdu SCI,1, --hdu SCI,2" in capsys.readouterr().err
    assert spy.calls["from_pretrained"] == []  # refused before the model loads
    out = _run(["caption", "acs/j94f05bgq_flt.fits", "--hdu", "SCI,2", "--max-new-tokens", "2", "--format", "json"],
               capsys)
    assert spy.last("caption")[0][1] == [ImageFile("acs/j94f05bgq_flt.fits", hdu=("SCI", 2))]
    assert [r["image"] for r in json.loads(out)] == ["acs/j94f05bgq_flt.fits"]
    cube = np.random.default_rng(0).normal(size=(4, 24, 24)).astype(np.float32)
    fits.PrimaryHDU(cube).writeto(tmp_path / "cube.fits")
    _run(["caption", str(tmp_path / "cube.fits"), "--plane", "3", "--max-new-tokens", "2"], capsys)
    assert spy.last("caption")[0][1] == [ImageFile(str(tmp_path / "cube.fits"), plane=3)]


def test_caption_on_error(spy, capsys, in_work, tmp_path):
    (tmp_path / "broken.fits").write_bytes(b"SIMPLE  = T" + b"\0" * 20)
    argv = ["caption", "m13.fits", str(tmp_path / "broken.fits"), "ngc1316.fits", "--max-new-tokens", "2",
            "--format", "csv", "-o", str(tmp_path / "c.csv")]
    assert main(argv) == 2
    out = capsys.readouterr()
    assert list(Table.read(out.out, format="ascii.csv")["image"]) == ["m13.fits", "ngc1316.fits"]
    assert list(Table.read(tmp_path / "c.csv")["image"]) == ["m13.fits", "ngc1316.fits"]
    assert "skipped" in out.err and "1 of 3 files could not be read" in out.err
    assert main([*argv, "--on-error", "stop"]) == 1
    assert len(spy.calls["from_pretrained"]) == 1  # the second run stopped before loading the model


# ----------------------------------------------------------------------------- ask
def test_ask_hdu_and_plane(spy, capsys, in_work):
    from astrovl.imaging.inputs import ImageFile

    assert main(["ask", "acs/j94f05bgq_flt.fits", "What is it?"]) == 1
    assert "--hdu SCI,1" in capsys.readouterr().err
    _run(["ask", "acs/j94f05bgq_flt.fits", "What is it?", "--hdu", "1", "--max-new-tokens", "2"], capsys)
    assert spy.last("ask")[0][1] == ImageFile("acs/j94f05bgq_flt.fits", hdu=1)
    assert main(["ask", "m13.fits", "What is it?", "--plane", "1"]) == 1
    assert "--plane 1 given for a 2-D image" in capsys.readouterr().err


def test_ask_image_and_question(spy, capsys):
    out = _run(["ask", "m13.fits", "How many stars?", "--max-new-tokens", "3"], capsys)
    args, kwargs = spy.last("ask")
    assert args[1] == "m13.fits" and args[2] == "How many stars?" and kwargs["max_new_tokens"] == 3
    expected = AstroLLaVA.from_pretrained(device="cpu").ask("m13.fits", "How many stars?", max_new_tokens=3)
    assert out.strip() == expected.strip()


@pytest.mark.parametrize("flag, value, check", [
    ("--max-new-tokens", "4", lambda s: s.last("ask")[1]["max_new_tokens"] == 4),
    ("--model", "UniverseTBD/AstroLLaVA_v1", lambda s: s.last("from_pretrained")[0][1] == "UniverseTBD/AstroLLaVA_v1"),
    ("--device", "cpu", lambda s: s.last("from_pretrained")[1]["device"] == "cpu"),
    ("--revision", "main", lambda s: s.last("from_pretrained")[1]["revision"] == "main"),
])
def test_ask_flags(spy, capsys, flag, value, check):
    _run(["ask", "m13.fits", "What is it?", "--max-new-tokens", "2", flag, value], capsys)
    assert check(spy)


# ----------------------------------------------------------------------------- convert-llava
def test_convert_llava_src_dst_and_flags(in_work, capsys, env):
    import torch

    out = _run(["convert-llava", "UniverseTBD/AstroLLaVA_v3", "conv-default"], capsys)
    assert "conv-default" in out
    record = json.loads((in_work / "conv-default" / "astrovl_conversion.json").read_text())
    assert record["repo_id"] == "UniverseTBD/AstroLLaVA_v3" and record["conversation"] == "vicuna_v1"
    # --dtype
    _run(["convert-llava", "UniverseTBD/AstroLLaVA_v3", "conv-half", "--dtype", "float16"], capsys)
    from safetensors import safe_open

    with safe_open(str(in_work / "conv-half" / "model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float16}
    # --revision: a newer main does not change what the pinned revision converts
    old = resolve_checkpoint("UniverseTBD/AstroLLaVA_v3").revision
    _run(["convert-llava", "UniverseTBD/AstroLLaVA_v3", "conv-rev", "--revision", old], capsys)
    assert json.loads((in_work / "conv-rev" / "astrovl_conversion.json").read_text())["revision"] == old
    # --vision-tower: another tower (a different tiny CLIP) changes the vision weights
    from astrovl.testing.clip import make_tiny_clip_tower

    make_tiny_clip_tower(in_work / "other-tower", seed=7)
    _run(["convert-llava", "UniverseTBD/AstroLLaVA_v3", "conv-tower", "--vision-tower", "other-tower"], capsys)
    record = json.loads((in_work / "conv-tower" / "astrovl_conversion.json").read_text())
    assert record["vision_tower"].endswith("other-tower")
    a = AstroLLaVA.from_pretrained(in_work / "conv-default", device="cpu").model.state_dict()
    b = AstroLLaVA.from_pretrained(in_work / "conv-tower", device="cpu").model.state_dict()
    key = next(k for k in a if "vision_tower" in k and k.endswith("fc1.weight"))
    assert not torch.equal(a[key], b[key])
    assert torch.equal(a["lm_head.weight"], b["lm_head.weight"])


# ----------------------------------------------------------------------------- train-llava
@pytest.fixture
def train_spy(spy):
    import astrovl.training
    import astrovl.training.llava as training

    calls = []
    original = training.train_llava

    def wrapper(model, data, config, **kw):
        result = original(model, data, config, **kw)
        calls.append((model, data, config, kw, result))
        return result

    spy.mp.setattr(astrovl.training, "train_llava", wrapper)
    return calls


BASE = ["train-llava", "--model", "astrollava-hf", "--stage", "1", "--data", "outreach", "--max-steps", "1",
        "--num-workers", "0"]


@pytest.mark.parametrize("extra, check", [
    (["--stage", "2"], lambda c, r, n: c.stage == 2 and c.lr == 2e-5),
    (["--epochs", "2.0"], lambda c, r, n: c.epochs == 2.0),
    (["--batch-size", "3"], lambda c, r, n: c.batch_size == 3),
    (["--lr", "0.05"], lambda c, r, n: c.lr == 0.05),
    (["--grad-accum", "2"], lambda c, r, n: c.gradient_accumulation_steps == 2),
    (["--seed", "5"], lambda c, r, n: c.seed == 5),
    (["--save-every", "1", "--max-steps", "2"],
     lambda c, r, n: json.loads((r.output_dir / "checkpoint" / "state.json").read_text())["step"] == 2),
    (["--eval-every", "1", "--max-steps", "2"],
     lambda c, r, n: list(r.history["step"]) == [1, 2] and bool(np.all(np.isfinite(r.history["val_loss"])))),
    (["--num-workers", "1"], lambda c, r, n: c.num_workers == 1),
    (["--device", "cpu"], lambda c, r, n: c.device == "cpu"),
    (["--max-steps", "3"], lambda c, r, n: r.history["step"][-1] == 3),
    (["--mix-data", "conv.json", "--mix-image-root", "outreach", "--mix-ratio", "0.5"],
     lambda c, r, n: c.mix_ratio == 0.5 and c.mix_image_root == "outreach" and r.history.meta["records"] == 2 * n),
])
def test_train_llava_flags(train_spy, capsys, tmp_path, env, extra, check):
    _run([*BASE, "--output", str(tmp_path / "run"), *extra], capsys)
    _, _, config, _, result = train_spy[-1]
    assert check(config, result, len(env["sky"].split("train")))


def test_train_llava_data_output_lora_image_root_and_resume(train_spy, capsys, tmp_path, env):
    out = _run([*BASE, "--output", str(tmp_path / "s1")], capsys)
    assert "model written to" in out and (tmp_path / "s1" / "model" / "config.json").is_file()
    _, data, config, _, result = train_spy[-1]
    # --data DIR: the dataset's train split is trained on, its val split evaluated
    assert result.history.meta["records"] == len(env["sky"].split("train"))
    assert result.history.meta["val_records"] == len(env["sky"].split("val"))
    # stage 2 with --lora on conversation JSON; --image-root holds the manifest, so val conversations are left out
    out = _run(["train-llava", "--model", str(tmp_path / "s1" / "model"), "--stage", "2", "--data", "conv.json",
                "--image-root", "outreach", "--lora", "--max-steps", "2", "--num-workers", "0",
                "--output", str(tmp_path / "s2")], capsys)
    assert "LoRA adapter written to" in out and (tmp_path / "s2" / "adapter" / "adapter_config.json").is_file()
    _, _, config, kw, result = train_spy[-1]
    assert config.lora and kw["image_root"] == "outreach"
    assert result.history.meta["records"] == len(env["sky"].split("train"))
    # --resume continues at the step of the checkpoint
    _run([*BASE, "--output", str(tmp_path / "r"), "--max-steps", "1", "--save-every", "1"], capsys)
    _run([*BASE, "--output", str(tmp_path / "r"), "--max-steps", "2", "--resume"], capsys)
    _, _, config, _, result = train_spy[-1]
    assert config.resume and list(result.history["step"]) == [1, 2]


def test_train_llava_model_and_revision(train_spy, spy, capsys, tmp_path):
    rev = resolve_checkpoint("llava-hf/llava-1.5-7b-hf").revision
    _run(["train-llava", "--model", "llava-hf/llava-1.5-7b-hf", "--revision", rev, "--stage", "1", "--data",
          "outreach", "--max-steps", "1", "--num-workers", "0", "--output", str(tmp_path / "x")], capsys)
    assert spy.last("from_pretrained")[1]["revision"] == rev
    assert train_spy[-1][0].source.startswith("llava-hf/llava-1.5-7b-hf@" + rev[:12])


# ----------------------------------------------------------------------------- evaluate galaxy10
@pytest.fixture
def eval_spy(spy):
    import astrovl.evaluation.descriptions as descriptions

    spy.method(descriptions, "load_galaxy10", "function")
    spy.method(descriptions.DescriptionEvaluator, "evaluate_model")
    return spy


G10 = ["evaluate", "galaxy10", "--limit", "10", "--max-new-tokens", "2"]


def test_galaxy10_default_data_model_and_table(eval_spy, capsys, tmp_path):
    out = _run([*G10, "-o", str(tmp_path / "g.ecsv")], capsys)
    args, kwargs = eval_spy.last("load_galaxy10")
    assert args[0] == "matthieulel/galaxy10_decals" and kwargs["split"] == "test"
    assert eval_spy.last("from_pretrained")[0][1] == "UniverseTBD/AstroLLaVA_v3"
    summary = Table.read(tmp_path / "g.ecsv")
    assert summary["label"][-1] == "all" and summary["n"][-1] == 10
    assert summary["published_astrollava"][-1] == 0.597 and "0.597" in out and "0.594" in out and "0.591" in out
    descriptions = Table.read(tmp_path / "g_descriptions.ecsv")
    assert len(descriptions) == 10 and set(descriptions["label"]) == set(summary["label"][:-1])
    assert (tmp_path / "g.png").stat().st_size > 5000


@pytest.mark.parametrize("flag, value, check", [
    ("--split", "train", lambda s: s.last("load_galaxy10")[1]["split"] == "train"),
    ("--limit", "5", lambda s: s.last("load_galaxy10")[1]["limit"] == 5),
    ("--seed", "3", lambda s: s.last("load_galaxy10")[1]["seed"] == 3),
    ("--max-new-tokens", "3", lambda s: s.last("evaluate_model")[1]["max_new_tokens"] == 3),
    ("--batch-size", "2", lambda s: s.last("evaluate_model")[1]["batch_size"] == 2),
    ("--references", "astrovl", lambda s: s.last("evaluate_model")[0][0].protocol.name == "astrovl"),
    ("--model", "llava-hf/llava-1.5-7b-hf", lambda s: s.last("from_pretrained")[0][1] == "llava-hf/llava-1.5-7b-hf"),
    ("--revision", "main", lambda s: s.last("from_pretrained")[1]["revision"] == "main"),
    ("--device", "cpu", lambda s: s.last("from_pretrained")[1]["device"] == "cpu"),
])
def test_galaxy10_flags(eval_spy, capsys, flag, value, check):
    _run([*G10, flag, value], capsys)
    assert check(eval_spy)


def test_galaxy10_data_argument_and_stratified_subset(eval_spy, capsys, tmp_path):
    out = _run(["evaluate", "galaxy10", "Galaxy10_DECals.h5", *G10[2:], "--split", "all", "--format", "csv"],
               capsys)
    assert eval_spy.last("load_galaxy10")[0][0] == "Galaxy10_DECals.h5"
    labels = eval_spy.last("evaluate_model")[0][3]
    assert sorted(labels) == list(range(10))  # 10 of 20 images, one per class
    summary = Table.read(out, format="ascii.csv")
    assert summary["n"][-1] == 10


def test_galaxy10_plot_and_format(eval_spy, capsys, tmp_path):
    out = _run([*G10, "--plot", str(tmp_path / "p.png"), "--format", "json"], capsys)
    assert (tmp_path / "p.png").stat().st_size > 5000
    rows = json.loads(out)
    assert rows[-1]["label"] == "all"


@pytest.mark.parametrize("flag, value", [("--k-percent", "5"), ("--pretrained", "openai")])
def test_galaxy10_rejects_retrieval_flags(in_work, capsys, flag, value):
    assert main([*G10, flag, value]) == 1
    err = capsys.readouterr().err
    assert f"{flag} applies to 'evaluate retrieval'" in err
