"""AstroLLaVA in ``astrovl serve``: /api/caption, /api/ask, the OpenAI API, batching and the queue.

A tiny LLaVA (random weights, real architecture) answers; greedy answers are
compared with what :class:`~astrovl.AstroLLaVA` gives alone. The OpenAI API is
exercised with the official ``openai`` client against a real uvicorn server on
loopback.
"""

from __future__ import annotations

import base64
import json
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from astropy.table import Table

pytest.importorskip("starlette")
pytest.importorskip("httpx")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")

from starlette.testclient import TestClient  # noqa: E402

from astrovl import AstroLLaVA  # noqa: E402
from astrovl.clip import TINY_CLIP_CONFIG, CLIPEmbedder, EmbeddingIndex  # noqa: E402
from astrovl.llava import ChatRequest  # noqa: E402
from astrovl.llava.template import DEFAULT_CAPTION_PROMPT  # noqa: E402
from astrovl.serve import create_app  # noqa: E402
from astrovl.serve.batching import MicroBatcher, ServiceBusy  # noqa: E402
from astrovl.testing.llava import make_tiny_llava  # noqa: E402
from astrovl.testing.serve import free_port  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")
TOKEN = "llava-test-token"
AUTH = {"authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_tiny_llava(tmp_path_factory.mktemp("llava") / "tiny")


@pytest.fixture(scope="module")
def llava(tiny_dir):
    return AstroLLaVA.from_pretrained(tiny_dir, device="cpu")


@pytest.fixture(scope="module")
def archive(tmp_path_factory, m13_path, ngc1316_path):
    base = tmp_path_factory.mktemp("serve-llava")
    images = base / "images"
    images.mkdir()
    paths = [str(shutil.copy(m13_path, images / "m13.fits")), str(shutil.copy(ngc1316_path, images / "n1316.fits"))]
    embedder = CLIPEmbedder.from_config(TINY_CLIP_CONFIG, seed=0)
    meta = Table({"path": paths, "name": ["M13", "NGC 1316"]})
    index = EmbeddingIndex.build(embedder, paths, metadata=meta, progress=False)
    index.save(base / "index")
    return {"base": base, "images": images, "index": index, "embedder": embedder, "paths": paths}


@pytest.fixture(scope="module")
def app(archive, llava):
    return create_app(archive["index"], archive["embedder"], index_dir=archive["base"] / "index",
                      image_root=archive["images"], thumbnail_cache=archive["base"] / "thumbs", llava=llava,
                      token=TOKEN, llava_max_tokens=64)


@pytest.fixture(scope="module")
def client(app):
    with TestClient(app, raise_server_exceptions=False, headers=AUTH) as c:
        yield c


@pytest.fixture(scope="module")
def server(app):
    """The app on a real uvicorn server on loopback, in a thread of this process."""
    import uvicorn

    port = free_port()
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", ws="none",
                                        lifespan="off"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not srv.started:
        assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    srv.should_exit = True
    thread.join(10)


@pytest.fixture(scope="module")
def oai(server):
    with openai.OpenAI(base_url=server + "/v1", api_key=TOKEN, max_retries=0, timeout=120) as c:
        yield c


def _data_url(path, media="image/fits") -> str:
    return f"data:{media};base64," + base64.b64encode(open(path, "rb").read()).decode()


def _events(text: str) -> list:
    return [json.loads(block[len("data: "):]) for block in text.split("\n\n") if block.startswith("data: {")]


# ---------------------------------------------------------------------- the model's batched, streamed generation
def test_generate_chats_answers_each_request_as_alone(llava, m13_path, ngc1316_path):
    pieces = {i: [] for i in range(5)}
    question = "What kind of object is this?"
    history = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe it."}]},
               {"role": "assistant", "content": [{"type": "text", "text": "A cluster."}]},
               {"role": "user", "content": [{"type": "text", "text": "How old?"}]}]
    requests = [
        ChatRequest([llava._user(DEFAULT_CAPTION_PROMPT)], image=m13_path, max_new_tokens=12),
        ChatRequest([llava._user(question)], image=ngc1316_path, max_new_tokens=7),
        ChatRequest(history, image=m13_path, max_new_tokens=9),
        ChatRequest([llava._user(question, with_image=False)], max_new_tokens=5),  # no image at all
        ChatRequest([llava._user(question)], image=m13_path, max_new_tokens=20, temperature=0.9, top_p=0.8),
    ]
    for i, r in enumerate(requests):
        r.on_text = pieces[i].append
    results = llava.generate_chats(requests)
    assert results[0].text == llava.caption(m13_path, max_new_tokens=12)
    assert results[1].text == llava.ask(ngc1316_path, question, max_new_tokens=7)
    assert results[2].text == llava.chat(m13_path, [("user", "Describe it."), ("assistant", "A cluster."),
                                                    ("user", "How old?")], max_new_tokens=9)
    for i, result in enumerate(results):
        assert "".join(pieces[i]) == result.text  # the streamed pieces are the answer
        assert result.finish_reason in ("stop", "length")
        assert 1 <= result.completion_tokens <= requests[i].max_new_tokens
        if result.finish_reason == "length":
            assert result.completion_tokens == requests[i].max_new_tokens
    # prompt tokens: the prompt as the model saw it, image tokens included, padding left out
    alone = llava.processor(images=[llava._pil(m13_path)], text=[llava._prompt([llava._user(DEFAULT_CAPTION_PROMPT)])],
                            return_tensors="pt")
    assert results[0].prompt_tokens == alone["input_ids"].shape[1]
    assert results[3].prompt_tokens < results[1].prompt_tokens  # no image tokens
    # stream() yields the pieces of the greedy caption
    streamed = list(llava.stream(m13_path, max_new_tokens=12))
    assert "".join(streamed) == results[0].text and len(streamed) >= 1


def test_stop_strings_cut_the_streamed_answer(llava, m13_path):
    full = llava.generate_chats([ChatRequest([llava._user("Describe.")], image=m13_path, max_new_tokens=16)])[0]
    words = full.text.split()
    if len(words) < 3:
        pytest.skip(f"the tiny model's answer {full.text!r} is too short to cut")
    stop = words[2]
    pieces = []
    cut = llava.generate_chats([ChatRequest([llava._user("Describe.")], image=m13_path, max_new_tokens=16,
                                            stop=[stop], on_text=pieces.append)])[0]
    assert cut.text == full.text[:full.text.find(stop)].strip()
    assert "".join(pieces) == cut.text and cut.finish_reason == "stop"
    assert stop not in "".join(pieces)


def test_chat_request_checks_its_inputs(llava, m13_path):
    with pytest.raises(ValueError, match="one image"):
        ChatRequest([{"role": "user", "content": [{"type": "image"}, {"type": "image"}]}], image=m13_path)
    with pytest.raises(ValueError, match="no image was given"):
        ChatRequest([llava._user("x")])
    with pytest.raises(ValueError, match="temperature"):
        ChatRequest([llava._user("x", with_image=False)], temperature=float("nan"))
    with pytest.raises(ValueError, match="max_new_tokens"):
        ChatRequest([llava._user("x", with_image=False)], max_new_tokens=0)


# ---------------------------------------------------------------------- the micro-batcher
def test_micro_batcher_batches_bounds_and_reports_errors():
    seen, release = [], threading.Event()

    def run(items):
        seen.append(list(items))
        if "boom" in items:
            raise RuntimeError("model failed")
        release.wait(5)
        return [x * 2 for x in items]

    batcher = MicroBatcher(run, max_batch=3, max_wait=0.05, max_queue=4, name="the test model")
    first = batcher.submit(1)
    time.sleep(0.2)  # the first batch runs (and blocks) with one item
    waiting = [batcher.submit(i) for i in (2, 3, 4, 5)]
    with pytest.raises(ServiceBusy, match="the test model is busy") as busy:
        batcher.submit(6)
    assert busy.value.status == 503 and busy.value.retry_after >= 1
    release.set()
    assert first.result(5) == 2 and [f.result(5) for f in waiting] == [4, 6, 8, 10]
    assert seen[0] == [1] and seen[1] == [2, 3, 4] and seen[2] == [5]
    assert batcher.largest_batch == 3
    failed = batcher.submit("boom")
    with pytest.raises(RuntimeError, match="model failed"):
        failed.result(5)
    assert batcher.submit(7).result(5) == 14  # the worker goes on after a failed batch
    batcher.close()
    with pytest.raises(RuntimeError, match="closed"):
        batcher.submit(8)


def test_concurrent_text_searches_share_one_pass_of_the_text_tower(app, client):
    service = app.state.service
    calls = []
    original = service.embedder.embed_text

    def counting(texts, **kw):
        calls.append(list(texts))
        time.sleep(0.05)
        return original(texts, **kw)

    service.embedder.embed_text = counting
    try:
        texts = [f"new query {i}" for i in range(8)]
        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(lambda q: client.get("/api/search", params={"q": q, "k": 2}).json(), texts))
    finally:
        service.embedder.embed_text = original
    assert sorted(t for c in calls for t in c) == sorted(texts)
    assert len(calls) < len(texts) and max(map(len, calls)) > 1
    for q, answer in zip(texts, answers):  # each query got its own vector
        expected = service.index.search(original([q])[0], k=2)
        assert [r["id"] for r in answer["results"]] == list(expected["row"])


# ---------------------------------------------------------------------- /api/caption and /api/ask
def test_caption_and_ask_an_item_and_an_upload(client, llava, archive, m13_path):
    r = client.post("/api/caption", json={"id": 0, "max_tokens": 10})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["text"] == llava.caption(archive["paths"][0], max_new_tokens=10)
    assert body["id"] == 0 and body["prompt"] == DEFAULT_CAPTION_PROMPT and body["finish_reason"] in ("stop", "length")
    assert body["usage"]["total_tokens"] == body["usage"]["prompt_tokens"] + body["usage"]["completion_tokens"]
    question = "Is there a bar?"
    r = client.post("/api/ask", files={"file": ("m13.fits", open(m13_path, "rb").read())},
                    data={"question": question, "max_tokens": "6"})
    assert r.status_code == 200, r.text
    assert r.json()["text"] == llava.ask(m13_path, question, max_new_tokens=6) and r.json()["id"] is None
    # streamed: server-sent events whose pieces add up to the same answer
    r = client.post("/api/ask", json={"id": 1, "question": question, "max_tokens": 8, "stream": True})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = _events(r.text)
    assert events[-1]["done"] is True
    text = "".join(e.get("text", "") for e in events[:-1])
    assert text == events[-1]["text"] == llava.ask(archive["paths"][1], question, max_new_tokens=8)


@pytest.mark.parametrize("path, kwargs, status, words", [
    ("/api/caption", {"json": {"id": 99}}, 404, "no item"),
    ("/api/caption", {"json": {"id": "x"}}, 404, "not a whole number"),
    ("/api/caption", {"json": {"id": 0, "max_tokens": 65}}, 400, "1 to 64"),
    ("/api/caption", {"json": {"id": 0, "max_tokens": "ten"}}, 400, "whole number"),
    ("/api/caption", {"json": {"id": 0, "prompt": "  "}}, 400, "empty"),
    ("/api/caption", {"json": {"id": 0, "prompt": "x" * 4001}}, 400, "at most 4000"),
    ("/api/caption", {"json": {"id": 0, "colour": 1}}, 400, "JSON object"),
    ("/api/caption", {"json": [0]}, 400, "JSON object"),
    # larger than the JSON limit (64 kB): refused before parsing, as everywhere in the service
    ("/api/caption", {"content": b"[" * 100000, "headers": {"content-type": "application/json"}}, 413, "JSON"),
    ("/api/caption", {"content": b"[" * 1000, "headers": {"content-type": "application/json"}}, 400, "JSON"),
    ("/api/caption", {"content": b"id=0", "headers": {"content-type": "text/plain"}}, 415, "multipart"),
    ("/api/caption", {"files": {"file": ("x.png", b"not a png")}}, 400, "could not be read"),
    ("/api/ask", {"json": {"id": 0}}, 400, "needs a question"),
    ("/api/ask", {"json": {"id": 0, "question": "x", "stream": "maybe"}}, 400, "true or false"),
])
def test_malformed_assistant_requests_get_4xx(client, path, kwargs, status, words):
    r = client.post(path, **kwargs)
    assert r.status_code == status, r.text
    assert words in r.json()["error"] and r.json()["status"] == status


# ---------------------------------------------------------------------- the OpenAI API, with the openai client
def test_openai_client_plain_and_streamed(oai, llava, m13_path):
    assert [m.id for m in oai.models.list().data] == [llava.source]
    question = "What kind of object is this?"
    messages = [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": _data_url(m13_path)}},
        {"type": "text", "text": question}]}]
    plain = oai.chat.completions.create(model=llava.source, messages=messages, max_tokens=9)
    expected = llava.ask(m13_path, question, max_new_tokens=9)
    assert plain.choices[0].message.content == expected and plain.choices[0].message.role == "assistant"
    assert plain.object == "chat.completion" and plain.choices[0].finish_reason in ("stop", "length")
    usage = plain.usage
    assert usage.prompt_tokens > 16 and 1 <= usage.completion_tokens <= 9  # 16 image tokens in the prompt
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    chunks = list(oai.chat.completions.create(model=llava.source, messages=messages, max_tokens=9, stream=True,
                                              stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == expected
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == plain.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == usage.completion_tokens and not chunks[-1].choices
    assert len({c.id for c in chunks}) == 1
    # a PNG, a system message, text-only turns, sampling and stop strings are accepted
    png = archive_png(m13_path)
    answer = oai.chat.completions.create(
        model=llava.source, max_tokens=5, temperature=0.7, top_p=0.9, stop=["zzz"],
        messages=[{"role": "system", "content": "You are an astronomer."},
                  {"role": "user", "content": [{"type": "text", "text": "Describe."},
                                               {"type": "image_url", "image_url": {"url": png}}]},
                  {"role": "assistant", "content": "A cluster."},
                  {"role": "user", "content": "How old is it?"}])
    assert answer.choices[0].message.content is not None and answer.usage.completion_tokens <= 5


def archive_png(path) -> str:
    import io

    from astrovl import load_image

    buf = io.BytesIO()
    load_image(path).to_pil().save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def test_eight_concurrent_chats_are_batched_and_all_succeed(app, oai, llava, archive):
    batcher = app.state.assistant.batcher
    before = batcher.batches
    questions = [f"Question {i}: what is it?" for i in range(8)]

    def chat(i):
        messages = [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": _data_url(archive["paths"][i % 2])}},
            {"type": "text", "text": questions[i]}]}]
        if i % 2:
            stream = oai.chat.completions.create(model=llava.source, messages=messages, max_tokens=8, stream=True)
            return "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
        return oai.chat.completions.create(model=llava.source, messages=messages, max_tokens=8).choices[0].message.content

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(chat, range(8)))
    assert answers == [llava.ask(archive["paths"][i % 2], questions[i], max_new_tokens=8) for i in range(8)]
    assert batcher.batches - before < 8 and batcher.largest_batch > 1  # requests shared batches


@pytest.mark.parametrize("url", ["http://127.0.0.1:9/x.png", "https://example.org/m13.fits", "file:///etc/passwd",
                                 "ftp://example.org/a.png", "/relative.png"])
def test_image_urls_are_never_fetched(oai, llava, url):
    with pytest.raises(openai.BadRequestError) as err:
        oai.chat.completions.create(model=llava.source, messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "What is it?"}]}])
    assert err.value.status_code == 400
    assert err.value.body["code"] == "image_url_not_allowed" and "data: URL" in err.value.body["message"]


@pytest.mark.parametrize("change, status, param", [
    ({"temperature": 3}, 400, "temperature"),
    ({"top_p": 0}, 400, "top_p"),
    ({"max_tokens": 65}, 400, "max_tokens"),
    ({"max_tokens": True}, 400, "max_tokens"),
    ({"n": 2}, 400, "n"),
    ({"logit_bias": {"1": 5}}, 400, "logit_bias"),
    ({"stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    ({"model": "gpt-4o"}, 404, "model"),
    ({"messages": []}, 400, "messages"),
    ({"messages": [{"role": "assistant", "content": "hi"}]}, 400, "messages"),
    ({"messages": [{"role": "tool", "content": "hi"}]}, 400, "messages[0].role"),
    ({"messages": [{"role": "user", "content": [{"type": "input_audio"}]}]}, 400, "messages[0].content"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/gif;base64,R0lG"}}]}]},
     400, "messages.content.image_url"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,@@"}}]}]},
     400, "messages.content.image_url"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}]},
     400, "messages.content.image_url"),
])
def test_bad_chat_requests_get_openai_errors(client, llava, change, status, param):
    body = {"model": llava.source, "messages": [{"role": "user", "content": "Hello?"}], **change}
    r = client.post("/v1/chat/completions", json=body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["param"] == param and error["message"] and error["type"]


def test_two_images_and_bodies_that_are_not_json(client, llava, m13_path):
    part = {"type": "image_url", "image_url": {"url": _data_url(m13_path)}}
    r = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": [part, part]}]})
    assert r.status_code == 400 and "one image" in r.json()["error"]["message"]
    r = client.post("/v1/chat/completions", content=b"{", headers={"content-type": "application/json"})
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    r = client.post("/v1/chat/completions", content=b"hi", headers={"content-type": "text/plain"})
    assert r.status_code == 415 and "error" in r.json()


# ---------------------------------------------------------------------- queue, token, disabled
def test_a_full_queue_answers_503_with_retry_after(archive, llava, tmp_path):
    app = create_app(archive["index"], archive["embedder"], thumbnail_cache=tmp_path, llava=llava,
                     llava_batch=1, llava_queue=1)
    batcher = app.state.assistant.batcher
    started, release = threading.Event(), threading.Event()
    run = batcher.run

    def slow(requests):
        started.set()
        release.wait(10)
        return run(requests)

    batcher.run = slow
    body = {"messages": [{"role": "user", "content": "Hello?"}], "max_tokens": 2}
    client = TestClient(app, raise_server_exceptions=False)
    with ThreadPoolExecutor(2) as pool:
        running = pool.submit(client.post, "/v1/chat/completions", json=body)
        assert started.wait(10)
        waiting = pool.submit(client.post, "/api/caption", json={"id": 0, "max_tokens": 2})
        deadline = time.monotonic() + 10
        while len(batcher) < 1 and time.monotonic() < deadline:
            time.sleep(0.02)
        full = client.post("/v1/chat/completions", json=body)
        full_api = client.post("/api/ask", json={"id": 0, "question": "x"})
        release.set()
        assert running.result().status_code == 200 and waiting.result().status_code == 200
    assert full.status_code == 503 and int(full.headers["retry-after"]) >= 1
    assert full.json()["error"]["code"] == "server_busy"
    assert full_api.status_code == 503 and "busy" in full_api.json()["error"]
    assert int(full_api.headers["retry-after"]) >= 1


def test_the_token_guards_the_assistant(app, llava):
    bare = TestClient(app, raise_server_exceptions=False)
    for method, path in (("GET", "/v1/models"), ("POST", "/v1/chat/completions"), ("POST", "/api/caption"),
                         ("POST", "/api/ask"), ("GET", "/v1/models?token=nope")):
        r = bare.request(method, path, json={"id": 0, "question": "x"})
        assert r.status_code == 401 and r.headers["content-type"].startswith("application/json"), path
    # the token as a query parameter is accepted on the API without a redirect
    r = bare.get("/v1/models", params={"token": TOKEN}, follow_redirects=False)
    assert r.status_code == 200 and r.json()["data"][0]["id"] == llava.source
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url="http://testserver/v1", api_key="wrong", max_retries=0,
                      http_client=bare).models.list()


def test_without_llava_the_assistant_answers_404_saying_how(archive, tmp_path):
    app = create_app(archive["index"], archive["embedder"], thumbnail_cache=tmp_path)
    client = TestClient(app, raise_server_exceptions=False)
    assert client.get("/api/info").json()["assistant"] is None
    for method, path in (("GET", "/v1/models"), ("POST", "/v1/chat/completions")):
        r = client.request(method, path, json={"messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 404 and "--llava" in r.json()["error"]["message"]
    for path in ("/api/caption", "/api/ask"):
        r = client.post(path, json={"id": 0, "question": "x"})
        assert r.status_code == 404 and "--llava" in r.json()["error"]


def test_info_describes_the_assistant(client, llava):
    info = client.get("/api/info").json()["assistant"]
    assert info["model"] == llava.source and info["max_tokens"] == 64 and info["max_batch"] == 8
    assert np.isscalar(info["max_queue"])


def test_cli_serve_with_llava(monkeypatch, archive, tiny_dir, tmp_path, capsys):
    from astrovl.cli import main
    from astrovl.serve import app as app_module

    clip_dir = tmp_path / "clip"
    archive["embedder"].save_pretrained(clip_dir)
    import astrovl.serve

    runs = []
    for module in (app_module, astrovl.serve):
        monkeypatch.setattr(module, "run_app", lambda app, host, port, **kw: runs.append(app))
    monkeypatch.delenv("ASTROVL_SERVE_TOKEN", raising=False)
    args = ["serve", str(archive["base"] / "index"), "--model", str(clip_dir), "--thumbnail-cache", str(tmp_path / "t")]
    assert main([*args, "--llava", str(tiny_dir), "--llava-batch", "4", "--llava-queue", "5",
                 "--llava-max-tokens", "16", "--text-batch", "3"]) == 0
    app = runs[-1]
    assistant = app.state.assistant
    assert (assistant.batcher.max_batch, assistant.batcher.max_queue, assistant.max_tokens) == (4, 5, 16)
    assert assistant.model_id == str(tiny_dir) and app.state.service.text_batcher.max_batch == 3
    assert "OpenAI-compatible API at http://127.0.0.1:8000/v1" in capsys.readouterr().out
    r = TestClient(app, base_url="http://127.0.0.1:8000").post("/api/caption", json={"id": 0, "max_tokens": 3})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] <= 3
    for flag in ("--llava-batch", "--llava-queue", "--llava-max-tokens", "--text-batch"):
        with pytest.raises(SystemExit) as exc:  # refused by the argument parser, before any model loads
            main([*args, flag, "0"])
        assert exc.value.code == 2
        assert flag in (err := capsys.readouterr().err) and "must be a whole number of at least 1" in err
    assert main(args) == 0 and runs[-1].state.assistant is None  # no --llava: no assistant
