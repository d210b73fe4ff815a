"""Building an index on a dask cluster, streamed to files: equal to a local build, resumable,
robust to a worker killed mid-shard. One LocalCluster of 2 worker processes for the module."""

from __future__ import annotations

import os
import signal
import threading
import time

import numpy as np
import pytest

from astrovl.cli import main
from astrovl.clip import TINY_CLIP_CONFIG, CLIPEmbedder, EmbeddingIndex
from astrovl.clip.archive import build_on_cluster, embed_shards_to_files
from astrovl.clip.sharded import local_cluster
from astrovl.utils.files import prepare_output_dir

distributed = pytest.importorskip("distributed")


@pytest.fixture(scope="module")
def client():
    import asyncio

    cluster = local_cluster(2)
    c = distributed.Client(cluster)
    yield c
    c.close()
    try:
        cluster.close(timeout=60)
    except (TimeoutError, asyncio.TimeoutError):
        # dask 2024.1 can time out stopping the worker that replaced the one a test killed
        # (the tests have checked their results by then); the worker processes end with pytest
        pass


@pytest.fixture(scope="module")
def embedder(tmp_path_factory):
    emb = CLIPEmbedder.from_config(TINY_CLIP_CONFIG, seed=0)
    emb.save_pretrained(tmp_path_factory.mktemp("model") / "tiny")
    return emb


@pytest.fixture(scope="module")
def images(m13_path, ngc1316_path, dss_path):
    return [str(m13_path), str(ngc1316_path), str(dss_path)] * 4


@pytest.fixture(scope="module")
def local(embedder, images):
    return EmbeddingIndex.build(embedder, images, progress=False)


def test_cluster_build_streams_shards_to_disk_and_equals_a_local_build(client, embedder, images, local,
                                                                         tmp_path):
    index = EmbeddingIndex.build(embedder, images, client=client, shard_size=5, directory=tmp_path / "idx",
                                 approximate="ivf", progress=False)
    np.testing.assert_allclose(index.vectors, local.vectors, atol=1e-5)
    assert list(index.metadata["source"]) == list(local.metadata["source"])
    assert isinstance(index._vec.chunks[0], np.memmap) and index.kind == "ivf"
    assert not (tmp_path / "idx" / "staging").exists()  # gone once the index is complete
    assert EmbeddingIndex.load(tmp_path / "idx").model_info["digest"] == embedder.weights_digest


def test_a_killed_build_resumes_without_recomputing_finished_shards(client, embedder, images, local, tmp_path):
    staging = prepare_output_dir(tmp_path / "idx", "index") / "staging"  # as build_on_cluster does
    paths = embed_shards_to_files(client, embedder, images, staging, shard_size=2, progress=False)
    assert len(paths) == 6 and all(p.is_file() for p in paths)
    # as a kill leaves it: some shards finished, one half-written temporary file
    for p in paths[3:]:
        p.unlink()
    (staging / ".shard-000003.npy.x1y2.part").write_bytes(b"\x93NUMPY half")
    submitted = []
    real_submit = client.submit
    client.submit = lambda *a, **kw: submitted.append(a[3]) or real_submit(*a, **kw)
    try:
        build_on_cluster(client, embedder, images, tmp_path / "idx", shard_size=2, progress=False)
    finally:
        del client.submit
    assert sorted(os.path.basename(s) for s in submitted) == [p.name for p in paths[3:]]  # the missing ones
    index = EmbeddingIndex.load(tmp_path / "idx")
    assert len(index) == len(images)  # nothing duplicated
    np.testing.assert_allclose(index.vectors, local.vectors, atol=1e-5)


def test_other_inputs_start_the_staging_area_over(client, embedder, images, tmp_path):
    staging = tmp_path / "staging"
    embed_shards_to_files(client, embedder, images[:4], staging, shard_size=2, progress=False)
    old = (staging / "shard-000000.npy").stat().st_mtime_ns
    paths = embed_shards_to_files(client, embedder, images[1:5], staging, shard_size=2, progress=False)
    assert (staging / "shard-000000.npy").stat().st_mtime_ns != old
    np.testing.assert_allclose(np.load(paths[0]), embedder.embed_images(images[1:3], progress=False), atol=1e-5)


def test_cli_scheduler_address(client, embedder, images, local, tmp_path, capsys):
    model = embedder.source["path"]
    assert main(["index", "build", *images[:3], "--index", str(tmp_path / "i"), "--model", model,
                 "--scheduler", client.scheduler.address, "--shard-size", "2", "--approximate", "ivfpq"]) == 0
    index = EmbeddingIndex.load(tmp_path / "i")
    assert index.kind == "ivfpq" and list(index.metadata["path"]) == images[:3]
    np.testing.assert_allclose(index.vectors, local.vectors[:3], atol=1e-5)
    assert main(["index", "build", images[0], "--index", str(tmp_path / "j"), "--model", model,
                 "--scheduler", "local:0"]) == 1
    assert "local:N" in capsys.readouterr().err


def test_a_worker_killed_mid_shard_is_replaced_without_duplicates(client, embedder, images, local, tmp_path):
    """Last in the module: the cluster's nanny restarts the killed worker."""
    many = images * 5  # 60 images, 30 shards
    staging = tmp_path / "idx" / "staging"
    result = {}

    def run():
        try:
            result["dir"] = build_on_cluster(client, embedder, many, tmp_path / "idx", shard_size=2,
                                             progress=False)
        except BaseException as exc:  # reported below
            result["error"] = exc

    thread = threading.Thread(target=run)
    thread.start()
    deadline = time.monotonic() + 60
    while not list(staging.glob("shard-*.npy")) and time.monotonic() < deadline:
        time.sleep(0.01)
    processing = client.processing()  # worker address -> keys it is running now
    busy = [w for w, keys in processing.items() if keys] or list(processing)
    pid = client.run(os.getpid, workers=busy[:1])[busy[0]]
    os.kill(pid, signal.SIGKILL)
    thread.join(120)
    assert "error" not in result, result.get("error")
    index = EmbeddingIndex.load(tmp_path / "idx")
    assert len(index) == len(many)
    np.testing.assert_allclose(index.vectors, np.tile(local.vectors, (5, 1)), atol=1e-5)
    assert list(index.metadata["source"]) == list(np.tile(local.metadata["source"], 5))


def test_local_cluster_status_page_is_on_a_free_loopback_port():
    """dask's default status page (port 8787 on every address) warns when the port is taken (an error
    here) and shows the cluster to the network; astrovl's clusters take a free loopback port."""
    import socket
    from urllib.parse import urlsplit

    holder = socket.socket()
    try:
        holder.bind(("127.0.0.1", 8787))
    except OSError:
        pass  # already taken: the same situation
    try:
        with local_cluster(1, processes=False) as cluster:
            port = cluster.scheduler.http_server.port
            assert port not in (None, 8787)
            socket.create_connection(("127.0.0.1", port), timeout=5).close()
            shown = urlsplit(cluster.dashboard_link).hostname  # the address dask shows: not listened on
            if shown not in ("127.0.0.1", "localhost"):
                with pytest.raises(OSError):
                    socket.create_connection((shown, port), timeout=5).close()
    finally:
        holder.close()
