"""The stores under faults and races: symlinks swapped in or planted, manifests that name other
paths, a delete during a download, an overwrite during reads, a full disk on every write path,
a process killed mid-write. Each case asserts that nothing outside the roots changed and that
nothing half-written remains. (The same on the real server, with kill -9 and real
disconnects: tests/integration/test_faults_live.py.)
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import json
import os
import threading
from pathlib import Path

import pytest
import torch

from server.storage import (
    ActivationStore,
    CaptureTooLarge,
    DamagedActivation,
    PresetStore,
    UnknownActivation,
    VectorStore,
)
from tests.faults import failing_disk

HELLO = [{"role": "user", "content": "Hello there"}]
HIDDEN = 64  # the tiny model's


def tree(root: Path) -> dict[str, str]:
    """Every file under ``root`` (symlinks as their target) with a digest of its bytes."""
    found = {}
    for path in sorted(root.rglob("*")):
        if path.is_symlink():
            found[str(path.relative_to(root))] = f"-> {os.readlink(path)}"
        elif path.is_file():
            found[str(path.relative_to(root))] = hashlib.sha256(path.read_bytes()).hexdigest()
    return found


def temporaries(root: Path) -> list[Path]:
    return [p for p in root.rglob(".*") if p.name.endswith((".tmp", ".part"))]


def unfinished(root: Path) -> list[Path]:
    return [p for p in root.rglob("act-*") if p.is_dir() and not (p / "manifest.json").exists()]


def capture(client, **fields) -> dict:
    body = {
        "messages": HELLO,
        "max_tokens": 3,
        "capture": {"layers": [0, 1], "hook_points": ["resid_post"], **fields},
    }
    response = client.post("/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text
    return response.json()["activations"]


@pytest.fixture
def outside(tmp_path) -> Path:
    """A folder outside every root, with a secret in it: it must stay as it is."""
    folder = tmp_path / "outside"
    folder.mkdir()
    (folder / "secret").write_text("not for clients")
    return folder


# -- confinement -------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["trace", "generate"])
def test_a_save_dir_swapped_for_a_symlink_mid_capture_writes_nothing_outside(
    client, activations_dir, outside, monkeypatch, mode
):
    """The capture's folder is held open: its files land in the folder it created, whatever its
    path now leads to; reading it back through the symlink is refused; a new capture into the
    symlinked save_dir is refused."""
    from server.storage import activations as storage

    subdir = f"swap-{mode}"
    real_append = storage.CaptureWriter.append
    swapped = []

    def swap_then_append(self, name, tensor):
        if not swapped:
            folder = activations_dir / subdir
            folder.rename(activations_dir / f"{subdir}-moved")
            folder.symlink_to(outside, target_is_directory=True)
            swapped.append(folder)
        real_append(self, name, tensor)

    monkeypatch.setattr(storage.CaptureWriter, "append", swap_then_append)
    before = tree(outside)
    ref = capture(client, mode=mode, save_dir=subdir)
    monkeypatch.undo()
    assert swapped and tree(outside) == before  # nothing created, written or followed outside
    moved = activations_dir / f"{subdir}-moved" / ref["id"]
    assert (moved / "manifest.json").is_file()  # it landed where it was created
    manifest = client.get(ref["manifest"])
    assert manifest.status_code == 404 and manifest.json()["error"]["code"] == "damaged_entry"
    again = client.post(
        "/v1/chat/completions",
        json={
            "messages": HELLO,
            "max_tokens": 2,
            "capture": {"hook_points": ["resid_post"], "save_dir": subdir},
        },
    )
    assert again.status_code == 400 and again.json()["error"]["param"] == "capture.save_dir"
    assert tree(outside) == before and not temporaries(activations_dir)


def test_planted_symlinks_and_manifest_entries_are_refused_not_followed(client, activations_dir, outside):
    ref = capture(client)
    folder = activations_dir / ref["directory"]
    name = ref["tensors"][0]
    tensor_file = folder / f"{name}.safetensors"
    tensor_file.unlink()
    tensor_file.symlink_to(outside / "secret")
    response = client.get(f"/v1/activations/{ref['id']}/{name}")
    assert response.status_code == 404 and response.json()["error"]["code"] == "damaged_entry"
    assert b"not for clients" not in response.content
    fifo = folder / f"{ref['tensors'][1]}.safetensors"
    fifo.unlink()
    os.mkfifo(fifo)  # opening it for reading would wait for a writer forever
    response = client.get(f"/v1/activations/{ref['id']}/{ref['tensors'][1]}")
    assert response.status_code == 404 and response.json()["error"]["code"] == "damaged_entry"

    second = capture(client)
    manifest_path = activations_dir / second["directory"] / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    for bad in ("../../outside/secret", "/etc/hostname", ".hidden", "manifest.json"):
        manifest["tensors"][0]["file"] = bad
        manifest_path.write_text(json.dumps(manifest))
        client.app.state.store._files.clear()  # as after a restart: nothing remembered
        for url in (second["manifest"], f"{second['manifest']}/{second['tensors'][0]}"):
            response = client.get(url)
            assert response.status_code == 404, (bad, response.text)
            assert response.json()["error"]["code"] == "damaged_entry"


def test_a_symlinked_capture_folder_is_never_indexed(activations_dir, outside):
    fake = outside / "act-0123456789abcdef0123456789abcdef"
    fake.mkdir()
    (fake / "manifest.json").write_text(json.dumps({"id": fake.name, "tensors": []}))
    (activations_dir / fake.name).symlink_to(fake, target_is_directory=True)
    before = tree(outside)
    store = ActivationStore(activations_dir)  # as at start-up
    with pytest.raises(UnknownActivation):
        store.manifest(fake.name)
    store.close()
    assert tree(outside) == before  # not indexed, not cleaned up either: not ours
    (activations_dir / fake.name).unlink()


def test_symlinks_and_damaged_files_in_the_vector_and_preset_stores(client, outside):
    vectors_root = client.app.state.vectors.vectors.root
    presets_root = client.app.state.vectors.presets.root
    elsewhere = VectorStore(outside / "vectors")
    elsewhere.put("stolen", torch.ones(HIDDEN), model=client.app.state.engine.model_id)
    (vectors_root / "stolen.safetensors").symlink_to(outside / "vectors" / "stolen.safetensors")
    (vectors_root / "garbage.safetensors").write_bytes(b"\x00" * 12)
    (presets_root / "stolen.json").symlink_to(outside / "secret")
    (presets_root / "garbage.json").write_text("{not json")
    (presets_root / "deep.json").write_text("[" * 100_000 + "]" * 100_000)  # past json's recursion
    os.mkfifo(vectors_root / "pipe.safetensors")  # opening it would wait for a writer
    try:
        listing = client.get("/v1/vectors").json()
        assert "stolen" not in [v["name"] for v in listing["data"]]  # a symlink is never listed
        assert [d["name"] for d in listing["damaged"]] == ["garbage"]
        for name in ("stolen", "garbage", "pipe"):
            response = client.get(f"/v1/vectors/{name}")
            assert response.status_code == 404, response.text
        item = {"type": "add", "layer": 0, "hook_point": "resid_post", "vector": "stolen"}
        response = client.post("/v1/chat/completions", json={"messages": HELLO, "interventions": [item]})
        assert response.status_code == 400 and response.json()["error"]["param"] == "interventions[0].vector"
        presets = client.get("/v1/interventions/presets").json()
        assert "stolen" not in [p["name"] for p in presets["data"]]
        assert [d["name"] for d in presets["damaged"]] == ["deep", "garbage"]
        response = client.post("/v1/chat/completions", json={"messages": HELLO, "presets": ["stolen"]})
        assert response.status_code == 400 and response.json()["error"]["param"] == "presets[0]"
        assert (outside / "secret").read_text() == "not for clients"
    finally:
        for path in ("stolen", "garbage", "pipe"):
            (vectors_root / f"{path}.safetensors").unlink()
        for path in ("stolen", "garbage", "deep"):
            (presets_root / f"{path}.json").unlink()


# -- races -------------------------------------------------------------------------------------


def test_a_delete_during_a_download_lets_it_finish(client):
    """The file is opened before the response starts; the delete removes its name, not the bytes
    the download is reading (over HTTP, on the real server: test_stores_live.py)."""
    store = client.app.state.store
    ref = capture(client, mode="generate")
    name = ref["tensors"][0]
    whole = client.get(f"/v1/activations/{ref['id']}/{name}").content
    handle, _ = store.open_tensor(ref["id"], name)
    with handle:
        first = handle.read(10)
        assert client.delete(f"/v1/activations/{ref['id']}").status_code == 200
        assert first + handle.read() == whole
    assert client.get(f"/v1/activations/{ref['id']}/{name}").status_code == 404  # refused cleanly now


def test_a_download_takes_one_byte_range(client):
    """Large tensors can be fetched in parts (and a download resumed): RFC 9110 ranges."""
    ref = capture(client)
    url = f"/v1/activations/{ref['id']}/{ref['tensors'][0]}"
    whole = client.get(url)
    assert whole.status_code == 200 and whole.headers["accept-ranges"] == "bytes"
    size = len(whole.content)
    for header, part in (
        ("bytes=0-9", whole.content[:10]),
        ("bytes=10-", whole.content[10:]),
        ("bytes=-5", whole.content[-5:]),
        (f"bytes=3-{size + 100}", whole.content[3:]),
    ):
        response = client.get(url, headers={"Range": header})
        assert response.status_code == 206 and response.content == part, header
        assert response.headers["content-range"].endswith(f"/{size}")
    assert client.get(url, headers={"Range": "Bytes=0-1"}).content == whole.content[:2]
    assert client.get(url, headers={"Range": f"bytes={size}-"}).status_code == 416
    for ignored in ("bytes=0-1,4-5", "lines=1-2", "bytes=9-3", "bytes=" + "9" * 5000 + "-"):
        response = client.get(url, headers={"Range": ignored})
        assert response.status_code == 200 and response.content == whole.content, ignored[:20]
    response = client.get(url, headers={"Range": "bytes=0-9", "If-Range": '"some-etag"'})
    assert response.status_code == 200 and response.content == whole.content  # no validator matches


def test_two_deletes_of_one_capture_one_succeeds(client):
    from concurrent.futures import ThreadPoolExecutor

    ref = capture(client)
    with ThreadPoolExecutor(4) as pool:
        codes = list(pool.map(lambda _: client.delete(f"/v1/activations/{ref['id']}").status_code, range(4)))
    assert sorted(codes) == [200, 404, 404, 404]


def test_an_overwrite_during_reads_never_mixes_values_and_metadata(tmp_path):
    """Values and metadata are one file: a reader sees version k's values with version k's
    metadata, never version k's values under version k-1's metadata."""
    store = VectorStore(tmp_path / "vectors")
    store.put("v", torch.zeros(256), description="0")
    stop = threading.Event()
    mixed: list[str] = []

    def writer():
        for version in range(1, 300):
            store.put("v", torch.full((256,), float(version)), description=str(version))
        stop.set()

    def reader():
        while not stop.is_set():
            meta, values = store.read("v")
            if not bool((values == float(meta["description"])).all()):
                mixed.append(meta["description"])

    threads = [threading.Thread(target=writer), *(threading.Thread(target=reader) for _ in range(3))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not mixed
    assert store.read("v")[0]["description"] == "299" and not temporaries(tmp_path)


# -- a full, read-only or forbidden disk on every write path -----------------------------------


@pytest.mark.parametrize("failure", [errno.ENOSPC, errno.EROFS, errno.EACCES])
@pytest.mark.parametrize("budget", [0, 300], ids=["first-byte", "mid-file"])
def test_a_vector_write_that_fails_keeps_the_old_version_whole(client, failure, budget):
    root = client.app.state.vectors.vectors.root
    old = {"name": "kept", "values": [1.0] * HIDDEN, "description": "old"}
    assert client.post("/v1/vectors", json=old).status_code == 200
    before = tree(root)
    with failing_disk(failure, budget) as disk:
        response = client.post("/v1/vectors", json={**old, "values": [2.0] * HIDDEN, "description": "new"})
        fresh = client.post("/v1/vectors", json={**old, "name": "fresh"})
    assert disk.failures == 2
    for failed in (response, fresh):
        assert failed.status_code == 507 and failed.json()["error"]["code"] == "storage_error"
    assert tree(root) == before and not temporaries(root)  # no orphan, no half file
    kept = client.get("/v1/vectors/kept").json()
    assert kept["description"] == "old" and kept["values"] == [1.0] * HIDDEN
    assert client.get("/v1/vectors/fresh").status_code == 404


def test_a_contrastive_write_that_fails_leaves_nothing(client):
    root = client.app.state.vectors.vectors.root
    before = tree(root)
    body = {"name": "mood", "positive": ["happy", "glad"], "negative": ["sad", "down"], "layers": [0, 1]}
    with failing_disk(errno.ENOSPC, budget=100):
        response = client.post("/v1/vectors/contrastive", json=body)
    assert response.status_code == 507, response.text
    assert not temporaries(root)
    assert set(tree(root)) - set(before) <= {"mood-layer0.safetensors"}  # at most whole earlier layers


@pytest.mark.parametrize("failure", [errno.ENOSPC, errno.EROFS])
def test_a_preset_write_that_fails_leaves_nothing(client, failure):
    root = client.app.state.vectors.presets.root
    before = tree(root)
    items = [{"type": "scale", "layer": 0, "hook_point": "resid_post", "factor": 0.5}]
    with failing_disk(failure, budget=10):
        response = client.post("/v1/interventions/presets", json={"name": "half", "items": items})
    assert response.status_code == 507 and response.json()["error"]["code"] == "storage_error"
    assert tree(root) == before and not temporaries(root)


def test_a_killed_process_leaves_nothing_half_written_after_a_restart(tmp_path):
    """What kill -9 can leave (a capture folder without its manifest, appended parts, temporary
    files in every store) is gone when the stores open again; finished entries stay."""
    activations, vectors = tmp_path / "activations", tmp_path / "vectors"
    store = ActivationStore(activations)
    writer = store.create("runs", "safetensors")
    writer.write("kept", torch.ones(3, 4))
    finished = writer.finish(mode="trace")["id"]
    dying = store.create("runs", "safetensors")
    dying.append("half", torch.ones(70_000, 1))  # past the flush size: a .part file on disk
    dying.folder.write_bytes("half.safetensors", b"whole file, no manifest yet")
    (activations / "runs" / finished / ".kept.safetensors.dead.tmp").write_bytes(b"half")
    vector_store = VectorStore(vectors)
    vector_store.put("v", torch.ones(4))
    (vectors / ".v.safetensors.dead.tmp").write_bytes(b"half")
    (vectors / "presets").mkdir()
    (vectors / "presets" / ".p.json.dead.tmp").write_bytes(b"half")
    assert temporaries(tmp_path) and unfinished(activations)
    # the process dies here: no abort, no close

    reopened = ActivationStore(activations)
    VectorStore(vectors), PresetStore(vectors / "presets")
    assert not temporaries(tmp_path) and not unfinished(activations)
    assert reopened.manifest(finished)["tensors"][0]["name"] == "kept"
    assert torch.equal(reopened.load_tensor(finished, "kept", "safetensors"), torch.ones(3, 4))


# -- limits ------------------------------------------------------------------------------------


def test_the_manifest_counts_toward_max_capture_bytes(tmp_path):
    tensor = torch.ones(8, 16)
    store = ActivationStore(tmp_path, max_capture_bytes=4096)
    writer = store.create(None, "safetensors")
    writer.write("t", tensor)  # about 600 bytes: within the limit
    with pytest.raises(CaptureTooLarge, match="max-capture-bytes"):
        writer.finish(mode="trace", tokens=["x" * 100] * 100)  # the manifest takes it past
    writer.abort()
    assert list(tmp_path.iterdir()) == []


def test_a_capture_over_the_limit_with_its_manifest_is_refused_before_it_runs(tiny_model_dir, tmp_path):
    from tests.apps import app_client

    with app_client(tiny_model_dir, tmp_path, max_capture_bytes=8192) as client:  # tensors: ~2 KB
        body = {"messages": HELLO, "max_tokens": 2, "capture": {"layers": [0], "hook_points": ["resid_post"]}}
        response = client.post("/v1/chat/completions", json=body)
        assert response.status_code == 400 and response.json()["error"]["code"] == "capture_too_large"
        assert "with its manifest" in response.json()["error"]["message"]
    assert not list((tmp_path / "activations").rglob("act-*"))


def test_a_manifest_stays_small_and_downloads_skip_it(client, monkeypatch):
    """Positions and tokens are listed once, not per tensor; a download finds its file without
    reading the manifest."""
    model = client.app.state.engine.loaded.hf_model
    modules = [f"{name}.output" for name, _ in model.named_modules() if name.startswith("model.layers.")]
    modules = [m for m in modules if not m.endswith(("rotary_emb.output", "act_fn.output"))]
    ref = capture(client, layers=None, hook_points=None, modules=modules)
    manifest = client.get(ref["manifest"])
    entries = len(manifest.json()["tensors"])
    positions = len(manifest.json()["token_positions"])
    assert entries == len(modules) > 20
    assert len(manifest.content) < 8192 + entries * 384 + positions * 48  # the admission estimate

    from server.storage import files

    real = files.Directory.read_bytes

    def no_manifest(self, name):
        assert name != "manifest.json", "a download read the manifest"
        return real(self, name)

    monkeypatch.setattr(files.Directory, "read_bytes", no_manifest)
    for name in ref["tensors"]:
        assert client.get(f"/v1/activations/{ref['id']}/{name}").status_code == 200


# -- a capture whose id never reached the client -----------------------------------------------


def _finished_capture(store):
    from server.engine.capture import CaptureResult

    writer = store.create(None, "safetensors")
    writer.write("t", torch.ones(2, 3))
    manifest = writer.finish(mode="trace")
    return CaptureResult(manifest["id"], writer.directory, ("t",), manifest, sink=store)


@pytest.mark.parametrize("went_out", [False, True])
def test_a_streamed_capture_is_removed_unless_the_chunk_naming_it_went_out(client, went_out):
    """The SSE framing marks a capture's id sent once the chunk carrying it went out (the server
    asked for the next chunk); a response that ends before that removes the capture."""
    from server.serving.base import expect_delivery, sse_stream

    store = client.app.state.store
    capture = _finished_capture(store)

    async def chunks():
        expect_delivery(capture)  # as the serving layer does when the engine hands it over
        yield {"choices": [{"index": 0, "delta": {}}], "activations": {"id": capture.id}}
        yield {"choices": [{"index": 0, "delta": {"content": "hi"}}]}

    async def respond():
        events = sse_stream(chunks())
        assert capture.id in await anext(events)
        if went_out:
            await anext(events)
        await events.aclose()  # the client left
        await asyncio.sleep(0.2)  # removal runs on a thread

    asyncio.run(respond())
    if went_out:
        assert store.manifest(capture.id)["id"] == capture.id
    else:
        with pytest.raises(UnknownActivation):
            store.manifest(capture.id)
        assert not capture.directory.exists()


@pytest.mark.parametrize("mode", ["trace", "generate"])
def test_a_capture_the_engine_never_handed_over_is_removed(client, mode):
    """The caller leaves before the capture reaches it: a trace capture still queued, or a
    generate-mode capture on a result never handed over (the job ended while the client read
    slowly)."""
    from server.engine.capture import CapturePlan, CaptureSpec
    from server.engine.job import GenerationJob, SamplingParams

    engine, store = client.app.state.engine, client.app.state.store
    before = {p.name for p in store.root.rglob("act-*")}
    points = tuple(engine.hooks.resolve(layers=[0, 1], hook_points=["resid_post"], modules=None))
    spec = CaptureSpec(CapturePlan(points=points, mode=mode), store, "chatcmpl-test")
    prompt = engine.loaded.tokenizer.encode("Hello there, how are you today?")

    async def leave_early() -> None:
        job = GenerationJob(
            prompt, SamplingParams(max_tokens=6, temperature=0, ignore_eos=True), capture=spec
        )
        stream = engine.stream(job)
        if mode == "generate":
            await anext(stream)  # a first delta; then the job ends while nobody reads
            await asyncio.wrap_future(engine.scheduler.submit_call(lambda: None))
        else:
            first = asyncio.ensure_future(anext(stream))
            await asyncio.sleep(0)
            first.cancel()  # gone before the capture arrived
            await asyncio.wrap_future(engine.scheduler.submit_call(lambda: None))
        await stream.aclose()
        await asyncio.sleep(0.3)  # removal runs on a thread

    asyncio.run(leave_early())
    assert {p.name for p in store.root.rglob("act-*")} == before


def test_damaged_activation_is_a_not_found_for_clients():
    assert issubclass(DamagedActivation, UnknownActivation)
