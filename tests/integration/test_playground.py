"""The playground (/ui) in a real browser: headless Chromium driven by Playwright, against the
embedded model served with an API key and an SAE.

Each view is checked against the public API called directly from here: the streamed chat
answer equals the server's non-streamed one, the steered side of a comparison equals the same
request sent with the intervention, the heatmap's cells are the norms (and projections) of the
captured residual stream, the logit lens' last layer names the tokens the model went on to
say, the feature list is the capture's top SAE features, and the LDA view's KL shading is the
server's own token statistics.

Chromium is Debian's ``chromium`` package (``bash scripts/install_browser.sh``; no browser is
downloaded at run time); where none is installed, every test here is skipped saying so.
Screenshots of each view go to ``$NNSIGHT_SERVER_SCREENSHOTS`` when it is set (docs/playground.md
shows the ones taken with ``NNSIGHT_SERVER_SCREENSHOTS=docs/images``), else to a temporary folder.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import threading
from pathlib import Path

import httpx
import pytest
import torch
from safetensors.torch import load, save_file

KEY = "playground-test-key"
SAE = "demo"
D_MODEL, D_SAE, SAE_LAYER = 576, 256, 10
BROWSER_ARGS = [  # a closed network: no background connections, no first-run work
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
ANSWER_S = 120_000  # ms a browser waits for an answer on a slow CI machine
CHAT = "What is the capital of France?"
STEER = "Describe your morning in one sentence."
INSPECT = "What is the capital of France?"


def chromium_executable() -> str | None:
    given = os.environ.get("NNSIGHT_SERVER_CHROMIUM")
    if given:
        return given
    return next(filter(None, map(shutil.which, ("chromium", "chromium-browser"))), None)


@pytest.fixture(scope="module")
def browser():
    executable = chromium_executable()
    if executable is None:
        pytest.skip("no Chromium installed: `bash scripts/install_browser.sh` installs Debian's chromium")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("playwright is not installed: `bash scripts/install.sh --dev` installs it")
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=executable, args=BROWSER_ARGS)
        yield launched
        launched.close()


def write_sae(folder: Path) -> Path:
    """A random SAE at the embedded model's layer-10 residual stream, in SAELens' format."""
    generator = torch.Generator().manual_seed(0)
    folder.mkdir(parents=True)
    save_file(
        {
            "W_enc": torch.randn(D_MODEL, D_SAE, generator=generator) * 0.05,
            "b_enc": torch.zeros(D_SAE),
            "W_dec": torch.randn(D_SAE, D_MODEL, generator=generator) * 0.05,
            "b_dec": torch.zeros(D_MODEL),
        },
        str(folder / "sae_weights.safetensors"),
    )
    config = {
        "architecture": "standard",
        "d_in": D_MODEL,
        "d_sae": D_SAE,
        "dtype": "float32",
        "apply_b_dec_to_input": True,
        "normalize_activations": "none",
        "metadata": {"hook_name": f"blocks.{SAE_LAYER}.hook_resid_post"},
    }
    (folder / "cfg.json").write_text(json.dumps(config))
    return folder


@pytest.fixture(scope="module")
def server(server_process, tmp_path_factory):
    work = tmp_path_factory.mktemp("playground")
    args = [
        "--api-key",
        KEY,
        "--sae",
        f"{SAE}={write_sae(work / 'sae')}",
        "--max-tokens-cap",
        "256",
        "--activations-dir",
        str(work / "activations"),
        "--vectors-dir",
        str(work / "vectors"),
    ]
    with server_process(args, work / "server.log") as running:
        yield running


@pytest.fixture(scope="module")
def api(server):
    with httpx.Client(base_url=server.url, headers={"authorization": f"Bearer {KEY}"}, timeout=300) as client:
        yield client


@pytest.fixture(scope="module")
def shots(tmp_path_factory) -> Path:
    folder = Path(os.environ.get("NNSIGHT_SERVER_SCREENSHOTS") or tmp_path_factory.mktemp("screenshots"))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def open_page(browser, url: str, key: str | None = KEY, path: str = "/ui/"):
    """A fresh tab (its own sessionStorage) on ``url + path``, with ``key`` typed into the key
    form. Script errors are collected in ``page.script_errors``."""
    page = browser.new_context(viewport={"width": 1280, "height": 900}).new_page()
    page.script_errors = []
    page.on("pageerror", lambda error: page.script_errors.append(str(error)))
    page.goto(url + path)
    if key is not None:
        page.fill("#key-input", key)
        page.click("#key-use")
        page.wait_for_selector("#model-name:has-text('layers')")
    return page


@pytest.fixture
def page(browser, server):
    page = open_page(browser, server.url)
    yield page
    assert page.script_errors == []
    page.context.close()


def reply_text(api, messages, **fields) -> dict:
    body = {"messages": messages, "temperature": 0, "max_tokens": 48, **fields}
    response = api.post("/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text
    return response.json()


def test_a_prompt_streams_its_answer(page, api, shots):
    page.fill("#chat-prompt", CHAT)
    page.get_by_role("button", name="Send", exact=True).click()
    answer = page.locator(".message.assistant").last
    answer.and_(page.locator("[data-state=done]")).wait_for(timeout=ANSWER_S)
    expected = reply_text(api, [{"role": "user", "content": CHAT}])["choices"][0]["message"]["content"]
    assert answer.text_content() == expected != ""
    assert int(answer.get_attribute("data-chunks")) > 1  # written as the chunks came, not at once
    page.screenshot(path=shots / "playground_chat.png")


def test_steering_gives_a_different_answer_for_the_same_seed(page, api, shots):
    page.get_by_role("tab", name="Steer").click()
    page.locator("details summary").click()
    page.fill("#contrast-name", "happy")
    page.fill("#contrast-positive", "I am so happy and joyful today.\nWhat a wonderful, delightful day.")
    page.fill("#contrast-negative", "I am so sad and miserable today.\nWhat a horrible, gloomy day.")
    page.fill("#contrast-layer", "10")
    page.click("#contrast-build")
    page.wait_for_selector("#contrast-status:has-text('stored happy-layer10')", timeout=ANSWER_S)
    page.fill("#steer-strength", "4")
    page.fill("#temperature", "0.9")  # sampled: the same seed on both sides is what makes them comparable
    page.fill("#seed", "1234")
    page.fill("#steer-prompt", STEER)
    page.click("#steer-compare")
    for side in ("#steer-plain", "#steer-steered"):
        page.wait_for_selector(f"{side}[data-state=done]", timeout=ANSWER_S)
    assert page.locator("#steer-seed").text_content() == "seed 1234"
    item = {"type": "add", "layer": 10, "hook_point": "resid_post", "vector": "happy-layer10", "scale": 4}
    messages = [{"role": "user", "content": STEER}]
    sampled = {"temperature": 0.9, "seed": 1234}
    plain = reply_text(api, messages, **sampled)["choices"][0]["message"]["content"]
    steered = reply_text(api, messages, **sampled, interventions=[item])["choices"][0]["message"]["content"]
    assert page.locator("#steer-plain").text_content() == plain
    assert page.locator("#steer-steered").text_content() == steered
    assert steered != plain
    page.screenshot(path=shots / "playground_steer.png", full_page=True)


def test_stop_ends_the_answer_and_the_conversation_keeps_what_was_shown(page):
    page.fill("#max-tokens", "200")
    page.fill("#chat-prompt", "Write a long story about a dragon.")
    page.get_by_role("button", name="Send", exact=True).click()
    answer = page.locator(".message.assistant").last
    streaming = ".message.assistant[data-state=streaming]:not([data-chunks='0'])"
    page.wait_for_selector(streaming, timeout=ANSWER_S)
    page.click("#chat-stop")
    answer.and_(page.locator("[data-state=stopped]")).wait_for()
    shown = answer.text_content()
    assert shown and int(answer.get_attribute("data-chunks")) < 200
    page.fill("#max-tokens", "4")
    page.fill("#chat-prompt", "Go on.")
    with page.expect_request("**/v1/chat/completions") as sent:
        page.get_by_role("button", name="Send", exact=True).click()
    messages = sent.value.post_data_json["messages"]
    assert messages[1] == {"role": "assistant", "content": shown}
    assert messages[2] == {"role": "user", "content": "Go on."}
    page.locator(".message.assistant").last.and_(page.locator("[data-state=done]")).wait_for(timeout=ANSWER_S)


@pytest.fixture(scope="module")
def inspected(browser, server, api):
    """The Inspect tab after one run (answer positions, logit lens, the SAE), and the same
    capture made through the API: ``(page, manifest, tensors)``."""
    direction = torch.linspace(-1, 1, D_MODEL)
    ramp = {"name": "ramp", "values": direction.tolist(), "layer": 12, "hook_point": "resid_post"}
    created = api.post("/v1/vectors", json=ramp)
    assert created.status_code == 200, created.text
    page = open_page(browser, server.url)
    page.get_by_role("tab", name="Inspect").click()
    page.fill("#max-tokens", "12")
    page.fill("#inspect-prompt", INSPECT)
    page.select_option("#inspect-positions", "generated")
    page.select_option("#inspect-sae", SAE)
    page.click("#inspect-run")
    page.wait_for_selector("#inspect-status:has-text('read and deleted')", timeout=ANSWER_S)
    capture = {
        "mode": "generate",
        "layers": "all",
        "hook_points": ["resid_post"],
        "positions": "generated",
        "dtype": "float32",
        "logit_lens": [29],
        "saes": [SAE],
        "sae_top_k": 5,  # as the page asks
    }
    reply = reply_text(api, [{"role": "user", "content": INSPECT}], max_tokens=12, capture=capture)
    activation_id = reply["activations"]["id"]
    manifest = api.get(f"/v1/activations/{activation_id}").json()
    tensors = {}
    for name in reply["activations"]["tensors"]:
        tensors.update(load(api.get(f"/v1/activations/{activation_id}/{name}").content))
    yield page, manifest, tensors, direction
    assert page.script_errors == []
    page.context.close()


def test_the_heatmap_has_one_cell_per_token_and_layer(inspected, server, api, shots):
    page, manifest, tensors, direction = inspected
    layers = api.get("/v1/model/structure").json()["num_layers"]
    tokens = len(manifest["token_positions"])
    assert page.locator("#heatmap .cell").count() == layers * tokens
    for layer in (0, 12, layers - 1):
        norms = tensors[f"layers.{layer}.resid_post"].norm(dim=-1)
        for position in (0, tokens - 1):
            cell = page.locator(f"#heatmap .cell[data-layer='{layer}'][data-position='{position}']")
            assert float(cell.get_attribute("data-value")) == pytest.approx(norms[position].item(), rel=1e-5)
    page.locator(".panel:has(#heatmap)").screenshot(path=shots / "playground_heatmap.png")

    page.select_option("#heatmap-vector", "ramp")
    page.select_option("#heatmap-metric", "projection")
    page.wait_for_selector("#heatmap-legend:has-text('projection')")
    unit = direction / direction.norm()
    projected = tensors["layers.12.resid_post"] @ unit
    cell = page.locator("#heatmap .cell[data-layer='12'][data-position='0']")
    assert float(cell.get_attribute("data-value")) == pytest.approx(projected[0].item(), rel=1e-4, abs=1e-4)
    page.select_option("#heatmap-metric", "norm")


def test_the_logit_lens_last_layer_names_the_next_token(inspected, shots):
    page, manifest, tensors, _ = inspected
    row = page.locator("#lens tr[data-layer='29'] td")
    ids = manifest["token_ids"]
    assert row.count() == len(ids)
    for position in range(len(ids) - 1):  # greedy: the top token is the one said next
        assert int(row.nth(position).get_attribute("data-token-id")) == ids[position + 1]
    assert tensors["logit_lens.layers.29.indices"][:, 0].tolist() == [
        int(row.nth(p).get_attribute("data-token-id")) for p in range(len(ids))
    ]
    page.locator("#lens").scroll_into_view_if_needed()
    page.locator("#lens").screenshot(path=shots / "playground_lens.png")


def test_the_feature_list_is_the_captures_top_sae_features(inspected, shots):
    page, manifest, tensors, _ = inspected
    indices, values = tensors[f"saes.{SAE}.indices"], tensors[f"saes.{SAE}.values"]
    rows = page.locator("#sae-features tr")
    assert rows.count() == len(manifest["token_positions"])
    for position in range(rows.count()):
        chips = rows.nth(position).locator("button").all()
        shown = [int(chip.get_attribute("data-feature")) for chip in chips]
        assert shown == [int(i) for i, v in zip(indices[position], values[position], strict=True) if v > 0]
    page.locator("#sae-features").screenshot(path=shots / "playground_sae.png")
    chip = rows.first.locator("button").first
    feature = chip.get_attribute("data-feature")
    chip.click()
    summary = page.locator("#steer-summary").text_content()
    assert '"type":"sae_add"' in summary and f'"feature":{feature}' in summary


def test_the_lda_view_shades_tokens_by_the_servers_kl(page, api, shots):
    page.get_by_role("tab", name="LDA").click()
    for kind in ("adapter", "model", ""):  # this server has no --adapter and no --lda-before
        assert page.locator(f"#lda-before-kind option[value='{kind}']").is_disabled()
    page.fill("#max-tokens", "24")
    page.fill("#lda-prompt", "Tell me about cats.")
    page.select_option("#lda-before-kind", "system_prompt")
    page.fill("#lda-before-value", "You are a pirate. Always talk like a pirate.")
    page.fill("#lda-alpha", "2")
    page.click("#lda-run")
    page.wait_for_selector("#lda-status:has-text('nats')", timeout=ANSWER_S)
    sides = page.locator(".lda-side")
    assert sides.count() == 3
    seed = int(re.search(r"seed (\d+)", page.locator("#lda-status").text_content()).group(1))
    for index, alpha in enumerate((-1, 0, 2)):
        response = api.post(
            "/v1/lda",
            json={
                "prompt": "Tell me about cats.",
                "alpha": alpha,
                "temperature": 0,
                "top_p": 1,
                "max_tokens": 24,
                "seed": seed,
                "token_stats": True,
                "before": {"system_prompt": "You are a pirate. Always talk like a pirate."},
            },
        )
        assert response.status_code == 200, response.text
        expected = response.json()["results"][0]
        side = sides.nth(index)
        assert side.locator(".answer").get_attribute("data-completion") == expected["completion"]
        shown = [float(span.get_attribute("data-kl")) for span in side.locator(".lda-token").all()]
        # the page's three requests ran as one batch, these one by one: float noise apart
        assert shown == pytest.approx([token["kl"] for token in expected["tokens"]], rel=1e-3, abs=1e-5)
    page.screenshot(path=shots / "playground_lda.png", full_page=True)


def test_a_bad_api_key_shows_the_error(browser, server, shots):
    page = open_page(browser, server.url, key=None)
    error = page.locator("#error")
    error.and_(page.locator(":text('missing API key')")).wait_for()
    assert page.locator("#key-form").is_visible()
    page.fill("#key-input", "not-the-key")
    page.click("#key-use")
    error.and_(page.locator(":text('incorrect API key')")).wait_for()
    page.fill("#chat-prompt", CHAT)
    page.get_by_role("button", name="Send", exact=True).click()
    page.wait_for_selector(".message.assistant.failed")
    assert "incorrect API key" in page.locator(".message.assistant").text_content()
    assert page.input_value("#chat-prompt") == CHAT  # given back, to send again with the right key
    assert "incorrect API key" in error.text_content()
    page.screenshot(path=shots / "playground_key.png")
    assert page.script_errors == []
    page.context.close()


class PortForward:
    """What ``ssh -L PORT:127.0.0.1:<server port>`` gives a browser: another address that relays
    bytes both ways (each connection relayed by two threads), so the page runs under a host and
    port the server never sees as its own."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:  # closed
                return
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(source, sink), daemon=True).start()

    @staticmethod
    def _pump(source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for end in (source, sink):
                try:
                    end.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        self.listener.close()


def test_the_page_works_through_a_tunnel_on_another_host_and_port(browser, server, api):
    """The page names no host or port: opened as http://localhost:<other port>/ui (no slash,
    as a user types it) through a relay, it loads, connects and streams an answer."""
    forward = PortForward(server.port)
    try:
        url = f"http://localhost:{forward.port}"
        page = open_page(browser, url, path="/ui")
        assert page.url == f"{url}/ui/"
        page.fill("#chat-prompt", CHAT)
        page.get_by_role("button", name="Send", exact=True).click()
        answer = page.locator(".message.assistant").last
        answer.and_(page.locator("[data-state=done]")).wait_for(timeout=ANSWER_S)
        expected = reply_text(api, [{"role": "user", "content": CHAT}])["choices"][0]["message"]["content"]
        assert answer.text_content() == expected
        assert page.script_errors == []
        page.context.close()
    finally:
        forward.close()
