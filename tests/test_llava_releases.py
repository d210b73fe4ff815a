"""The released LLaVA checkpoints as they really are, key for key, loaded by hub id (offline).

The fixtures (:mod:`astrovl.testing.releases`) are checked against the release manifests in
``tests/data/release_manifests`` (the releases' own config, index and tokenizer files, and their
file lists): file names, weight names (modulo the number of layers), dtypes and configuration
fields, so a fixture that drifts from the release fails here. Then each release loads, the way
docs/llava.rst's table says.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import pytest
import torch

from astrovl import AstroLLaVA
from astrovl.exceptions import CheckpointError, ModelNotFoundError
from astrovl.llava.hub import TrainingPathWarning
from astrovl.testing import CURRENT_TOWER_ID, NOT_WRITTEN, RELEASES

pytestmark = pytest.mark.usefixtures("one_torch_thread")

MANIFESTS = Path(__file__).parent / "data" / "release_manifests"
TOWER = "openai/clip-vit-large-patch14-336"
SIZE_KEYS = {"hidden_size", "intermediate_size", "num_attention_heads", "num_hidden_layers", "num_key_value_heads",
             "vocab_size", "mm_hidden_size", "image_size", "r", "lora_alpha", "image_token_index", "pad_token_id",
             "height", "width", "shortest_edge", "total_size", "projection_dim"}
# files the manifest's page excerpt cut off but that the release most probably holds (files.txt says so)
PROBABLY_PRESENT = {"UniverseTBD/AstroLLaVA_v1": {"tokenizer_config.json", "trainer_state.json"}}
_FILE = re.compile(r"^(\.gitattributes|[\w.-]+\.(json|bin|safetensors|model|md|txt|h5|jinja))$")


def _manifest(repo_id: str) -> Path:
    path = MANIFESTS / repo_id.replace("/", "--")
    if not path.is_dir():
        pytest.skip(f"no release manifest for {repo_id}")
    return path


def _manifest_files(repo_id: str) -> set[str]:
    names = set()
    for line in (_manifest(repo_id) / "files.txt").read_text().splitlines():
        if line.startswith(("#", "...")):
            continue
        names.update(t for t in line.split() if _FILE.match(t))
    return names | PROBABLY_PRESENT.get(repo_id, set())


def _generic(key: str) -> str:
    return re.sub(r"\.layers\.\d+\.", ".layers.N.", key)


def _expand(pattern: str) -> list[str]:
    """``a.{0..2}.{x,y}`` -> every name it stands for."""
    m = re.search(r"\{([^}]*)\}", pattern)
    if m is None:
        return [pattern]
    body = m.group(1)
    if ".." in body:
        lo, hi = body.split("..")
        options = [str(i) for i in range(int(lo), int(hi) + 1)]
    else:
        options = body.split(",")
    return [n for o in options for n in _expand(pattern[:m.start()] + o + pattern[m.end():])]


def _manifest_keys(repo_id: str, section: str | None = None) -> set[str]:
    """Weight names of a release (layer numbers generic), from its index json or key list."""
    d = _manifest(repo_id)
    for index in ("verbatim/pytorch_model.bin.index.json", "verbatim/model.safetensors.index.json",
                  "pytorch_model.bin.index.RECONSTRUCTED.json"):
        if (d / index).is_file():
            return {_generic(k) for k in json.loads((d / index).read_text())["weight_map"]}
    name = next(f for f in ("weight-index.txt", "weight-index.RECONSTRUCTED.txt", "weight-keys.INFERRED.txt")
                if (d / f).is_file())
    keys, current = set(), None
    for line in (d / name).read_text().splitlines():
        if line.startswith("## "):
            current = line[3:].split()[0]
        if not line.strip() or line.startswith("#") or "->" in line:
            continue
        if section is not None and current != section:
            continue
        keys.update(_generic(k) for k in _expand(line.split()[0]) if "," not in k)
    return keys


def _weights(directory: Path, names) -> dict:
    from safetensors.torch import load_file

    state = {}
    for n in names:
        f = directory / n
        state.update(load_file(str(f)) if n.endswith(".safetensors")
                     else torch.load(str(f), map_location="cpu", weights_only=True))
    return state


def _index_files(directory: Path, index: str) -> list[str]:
    return sorted(set(json.loads((directory / index).read_text())["weight_map"].values()))


def _same_fields(fixture: dict, manifest: dict, where: str) -> None:
    """Same fields (a tiny model may add size fields the release leaves at their defaults), same values but sizes."""
    extra = set(fixture) - set(manifest)
    assert set(manifest) <= set(fixture) and extra <= SIZE_KEYS, (where, set(manifest) ^ set(fixture))
    for k, v in manifest.items():
        if isinstance(v, dict) and isinstance(fixture[k], dict):
            _same_fields(fixture[k], v, f"{where}.{k}")
        elif k not in SIZE_KEYS:
            assert fixture[k] == v, (where, k, fixture[k], v)


def _read(path: Path) -> dict:
    return json.loads(path.read_text())


F16, BF16, F32, I64 = torch.float16, torch.bfloat16, torch.float32, torch.int64


def _fp16_but_inv_freq(key):
    return F32 if key.endswith("rotary_emb.inv_freq") else F16


#: repo -> (weight files or index, manifest section, dtype of a key)
WEIGHTS = {
    "liuhaotian/llava-v1.5-7b": ("pytorch_model.bin.index.json", None, _fp16_but_inv_freq),
    "lmsys/vicuna-7b-v1.5": ("pytorch_model.bin.index.json", None, _fp16_but_inv_freq),
    TOWER: (["pytorch_model.bin"], None, lambda k: I64 if k.endswith("position_ids") else F32),
    "liuhaotian/llava-v1.5-7b-lora": (["adapter_model.bin"], "adapter_model.bin", lambda k: BF16),
    "UniverseTBD/AstroLLaVA_v3": ("model.safetensors.index.json", None, lambda k: BF16),
    "llava-hf/llava-1.5-7b-hf": ("model.safetensors.index.json", None, lambda k: F16),
}
# v1 and v2 have the layout of the official LoRA (same LLaVA training code)
LORA_LIKE = ("liuhaotian/llava-v1.5-7b-lora", "UniverseTBD/AstroLLaVA_v1", "UniverseTBD/AstroLLaVA_v2")


@pytest.mark.parametrize("repo_id", [r for r in RELEASES if r != CURRENT_TOWER_ID])
def test_fixture_files_match_the_release(release_files, repo_id):
    snapshot = release_files["cache"] / f"models--{repo_id.replace('/', '--')}" / "snapshots"
    snapshot = next(snapshot.iterdir())
    written = {p.name for p in snapshot.iterdir()}
    assert written == _manifest_files(repo_id) - set(NOT_WRITTEN.get(repo_id, {})), repo_id
    if repo_id in LORA_LIKE:
        adapter = _weights(snapshot, ["adapter_model.bin"])
        projector = _weights(snapshot, ["non_lora_trainables.bin"])
        lora = "liuhaotian/llava-v1.5-7b-lora"
        assert {_generic(k) for k in adapter} == _manifest_keys(lora, "adapter_model.bin")
        assert set(projector) == _manifest_keys(lora, "non_lora_trainables.bin")
        assert {v.dtype for v in [*adapter.values(), *projector.values()]} == {BF16}
    if repo_id in WEIGHTS:
        files, section, dtype = WEIGHTS[repo_id]
        state = _weights(snapshot, files if isinstance(files, list) else _index_files(snapshot, files))
        assert {_generic(k) for k in state} == _manifest_keys(repo_id, section)
        wrong = {k: v.dtype for k, v in state.items() if v.dtype != dtype(k)}
        assert not wrong, wrong
        if isinstance(files, str):  # the index lists exactly the weights, and the shard files are the release's
            index = _read(snapshot / files)["weight_map"]
            assert set(index) == set(state)


def test_fixture_configs_match_the_release(release_files):
    def snap(repo_id):
        return next((release_files["cache"] / f"models--{repo_id.replace('/', '--')}" / "snapshots").iterdir())

    v15, vic, hf = (_manifest(r) for r in ("liuhaotian/llava-v1.5-7b", "lmsys/vicuna-7b-v1.5",
                                           "llava-hf/llava-1.5-7b-hf"))
    s = snap("liuhaotian/llava-v1.5-7b")
    assert list(_read(s / "config.json")) == list(_read(v15 / "verbatim/config.json"))
    _same_fields(_read(s / "config.json"), _read(v15 / "verbatim/config.json"), "llava-v1.5-7b")
    for name in ("tokenizer_config.json", "special_tokens_map.json", "generation_config.json"):
        assert _read(s / name) == _read(v15 / "verbatim" / name), name
    # the non-layer weights sit in the release's shards
    index, real = _read(s / "pytorch_model.bin.index.json")["weight_map"], \
        _read(v15 / "verbatim/pytorch_model.bin.index.json")["weight_map"]
    assert {k: v for k, v in index.items() if ".layers." not in k} == \
        {k: v for k, v in real.items() if ".layers." not in k}
    s = snap("lmsys/vicuna-7b-v1.5")
    _same_fields(_read(s / "config.json"), _read(vic / "config.json"), "vicuna")
    assert _read(s / "generation_config.json") == _read(vic / "generation_config.json")
    lora = snap("liuhaotian/llava-v1.5-7b-lora")
    _same_fields(_read(lora / "adapter_config.json"),
                 _read(_manifest("liuhaotian/llava-v1.5-7b-lora") / "adapter_config.json"), "lora")
    for repo in ("UniverseTBD/AstroLLaVA_v1", "UniverseTBD/AstroLLaVA_v2"):
        _same_fields(_read(snap(repo) / "adapter_config.json"), _read(_manifest(repo) / "adapter_config.json"), repo)
    s = snap("llava-hf/llava-1.5-7b-hf")
    for name in ("config.json", "preprocessor_config.json", "processor_config.json", "generation_config.json",
                 "tokenizer_config.json", "special_tokens_map.json", "chat_template.json"):
        fixture, real = _read(s / name), _read(hf / "verbatim" / name)
        if name == "tokenizer_config.json":  # token ids: after the tiny vocabulary, not after 32000
            assert list(fixture.pop("added_tokens_decoder").values()) == \
                list(real.pop("added_tokens_decoder").values())
        _same_fields(fixture, real, name)
    assert list(_read(s / "added_tokens.json")) == list(_read(hf / "verbatim/added_tokens.json"))
    assert (s / "chat_template.jinja").read_text().strip() == (hf / "verbatim/chat_template.jinja").read_text().strip()


def test_current_transformers_tower_has_no_vision_model_level(release_files):
    from safetensors.torch import load_file

    directory = release_files["sources"][CURRENT_TOWER_ID]
    keys = set(load_file(str(directory / "model.safetensors")))
    tower = set(torch.load(str(release_files["sources"][TOWER] / "pytorch_model.bin"), weights_only=True))
    # the same weights as the tower's vision_model.*, under the names this transformers saves
    assert len(keys) == len({k for k in tower if k.startswith("vision_model.") and not k.endswith("position_ids")})


def _logits(model, image=None):
    import numpy as np

    inputs = model.model_inputs(np.ones((8, 8)) if image is None else image, "What is it?")
    with torch.inference_mode():
        return model.model(**inputs).logits[0, -1]


def test_released_buffers_are_dropped_and_other_keys_still_fail(release_hub, tmp_path, caplog):
    import shutil

    from astrovl import conf

    caplog.set_level(logging.DEBUG, logger="astrovl.llava")
    with conf.set_temp("cache_dir", str(tmp_path / "own-cache")):  # converted here, whatever ran before
        AstroLLaVA.from_pretrained("liuhaotian/llava-v1.5-7b", device="cpu")
    assert "dropping 'model.language_model.layers.1.self_attn.rotary_emb.inv_freq'" in caplog.text
    assert re.search(r"dropping 'model\.vision_tower\.(vision_model\.)?embeddings\.position_ids'", caplog.text)
    bad = tmp_path / "llava-v1.5-7b"
    shutil.copytree(release_hub["sources"]["liuhaotian/llava-v1.5-7b"], bad)
    shard = bad / "pytorch_model-00002-of-00002.bin"
    state = torch.load(str(shard), weights_only=True)
    state["model.layers.1.self_attn.extra_proj.weight"] = torch.zeros(2, 2, dtype=torch.float16)
    torch.save(state, shard)
    with pytest.raises(CheckpointError, match=r"unexpected \['model\.language_model\.layers\.1\.self_attn\.extra_proj"):
        AstroLLaVA.from_pretrained(bad, device="cpu")


def test_vision_tower_takes_effect_and_keys_the_cache(release_hub, caplog):
    from astrovl.llava.convert import converted_cache_path
    from astrovl.llava.hub import resolve_checkpoint

    caplog.set_level(logging.INFO, logger="astrovl.llava.convert")
    v15 = AstroLLaVA.from_pretrained("liuhaotian/llava-v1.5-7b", device="cpu")
    # the tower saved by today's transformers (no vision_model. level): the same weights, the same model
    current = AstroLLaVA.from_pretrained("liuhaotian/llava-v1.5-7b", device="cpu", vision_tower=CURRENT_TOWER_ID)
    torch.testing.assert_close(_logits(current), _logits(v15), rtol=0, atol=1e-5)
    source = resolve_checkpoint("liuhaotian/llava-v1.5-7b")
    paths = {converted_cache_path(source), converted_cache_path(source, vision_tower=CURRENT_TOWER_ID)}
    assert len(paths) == 2 and all(p.parent.name == source.revision for p in paths)
    # AstroLLaVA_v3 holds its tower; vision_tower= replaces it, and the default is not overwritten
    v3 = AstroLLaVA.from_pretrained("UniverseTBD/AstroLLaVA_v3", device="cpu")
    other = AstroLLaVA.from_pretrained("UniverseTBD/AstroLLaVA_v3", device="cpu", vision_tower=TOWER)
    assert not torch.allclose(_logits(other), _logits(v3), atol=1e-3)
    caplog.clear()
    again = AstroLLaVA.from_pretrained("UniverseTBD/AstroLLaVA_v3", device="cpu")
    assert "reusing the conversion" in caplog.text
    torch.testing.assert_close(_logits(again), _logits(v3))


def test_official_lora_on_a_plain_llm(release_hub, expect_warning):
    with expect_warning(TrainingPathWarning, r"'\./checkpoints/vicuna-7b-v1-5'.*'lmsys/vicuna-7b-v1\.5'"):
        release = AstroLLaVA.from_pretrained("liuhaotian/llava-v1.5-7b-lora", device="cpu")
    assert "LoRA on lmsys/vicuna-7b-v1.5@" in release.source and hasattr(release.model, "merge_and_unload")
    assert release.prompt_tokenization == "llava_chunks"
    # base= overrides the recorded base (no warning); merge=True merges
    merged = AstroLLaVA.from_pretrained("liuhaotian/llava-v1.5-7b-lora", device="cpu", base="lmsys/vicuna-7b-v1.5",
                                        merge=True)
    assert not hasattr(merged.model, "merge_and_unload")
    torch.testing.assert_close(_logits(merged), _logits(release), rtol=0, atol=1e-4)
    # the adapter matters
    with release.model.disable_adapter():
        without = _logits(release)
    assert not torch.allclose(without, _logits(release), atol=1e-3)


def test_astrollava_v1_and_v2_load(release_hub, expect_warning):
    with expect_warning(TrainingPathWarning, "/data/szaman/llava-finetuning/llava-v1.5-7b.*liuhaotian/llava-v1.5-7b"):
        v2 = AstroLLaVA.from_pretrained("UniverseTBD/AstroLLaVA_v2", device="cpu")
    assert "LoRA on liuhaotian/llava-v1.5-7b@" in v2.source and v2.prompt_tokenization == "llava_chunks"
    v1 = AstroLLaVA.from_pretrained("UniverseTBD/AstroLLaVA_v1", device="cpu")
    assert "LoRA on llava-hf/llava-1.5-7b-hf@" in v1.source and v1.prompt_tokenization is None
    hf = AstroLLaVA.from_pretrained("llava-hf/llava-1.5-7b-hf", device="cpu")
    assert not torch.allclose(_logits(v1), _logits(hf), atol=1e-3)


@pytest.mark.parametrize("name", ["checkpoints/llava/final", "./llava-v1.5-7b", "../llava-v1.5-7b",
                                  "/no/such/llava", "~/no-such-llava", "a/b/c"])
def test_local_names_never_reach_the_hub(release_hub, name, monkeypatch):
    import huggingface_hub

    from astrovl import CLIPEmbedder
    from astrovl.utils.hub import is_local_name

    def no_hub(*args, **kwargs):
        raise AssertionError(f"{name!r} was sent to the hub")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", no_hub)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", no_hub)
    assert is_local_name(name)
    with pytest.raises(ModelNotFoundError, match="directory not found"):
        AstroLLaVA.from_pretrained(name, device="cpu")
    with pytest.raises(ModelNotFoundError, match="directory not found"):
        CLIPEmbedder.from_pretrained(name)


def test_existing_relative_directory_is_local(release_hub, tmp_path, monkeypatch):
    import shutil

    from astrovl.llava.hub import resolve_checkpoint
    from astrovl.utils.hub import is_local_name, looks_like_repo_id

    monkeypatch.chdir(tmp_path)
    shutil.copytree(release_hub["sources"]["UniverseTBD/AstroLLaVA_v3"], tmp_path / "UniverseTBD" / "AstroLLaVA_v3")
    assert is_local_name("UniverseTBD/AstroLLaVA_v3") and not looks_like_repo_id("UniverseTBD/AstroLLaVA_v3")
    assert resolve_checkpoint("UniverseTBD/AstroLLaVA_v3").repo_id is None
    monkeypatch.chdir(tmp_path.parent)
    assert looks_like_repo_id("UniverseTBD/AstroLLaVA_v3")


def test_cache_key_follows_a_local_tower_content(release_hub, tmp_path):
    import shutil

    from astrovl.llava.convert import converted_cache_path
    from astrovl.llava.hub import resolve_checkpoint

    tower = tmp_path / "tower"
    shutil.copytree(release_hub["sources"][TOWER], tower)
    source = resolve_checkpoint("liuhaotian/llava-v1.5-7b")
    first = converted_cache_path(source, vision_tower=tower)
    assert first == converted_cache_path(source, vision_tower=str(tower))
    cfg = json.loads((tower / "preprocessor_config.json").read_text())
    cfg["image_mean"] = [0.5, 0.5, 0.5]
    (tower / "preprocessor_config.json").write_text(json.dumps(cfg))
    assert converted_cache_path(source, vision_tower=tower) != first
    assert converted_cache_path(source, vision_tower=tower) != converted_cache_path(source)
