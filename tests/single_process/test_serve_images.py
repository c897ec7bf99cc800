"""Images through `glmserve serve` (one process) on the tiny glm4v_moe model, with the official `openai`
client: `data:` URLs, local files under --allowed-local-media-path and http URLs give the tokens the
offline API gives for the same images; bad images are OpenAI-style 400s (not an image, too large an
upload, unreachable URL, a file outside the allowed path, too many images) and the server keeps serving."""

from __future__ import annotations

import base64
import http.server
import io
import threading

import openai
import pytest

from glmserve import LLM, SamplingParams
from glmserve.local_ports import free_port
from tests.engine.vl_reference import make_vl_model, random_image
from tests.serving.serve_process import ServeProcess

GREEDY = dict(max_tokens=16, temperature=0, extra_body={"min_tokens": 16, "return_token_ids": True})


def _png(img) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _data_url(img) -> str:
    return "data:image/png;base64," + base64.b64encode(_png(img)).decode()


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve_images")
    model_dir = make_vl_model(root / "model", seed=6)
    media = root / "media"
    media.mkdir()
    random_image(48, 40, seed=3).save(media / "local.png")
    (root / "outside.png").write_bytes(_png(random_image(24, 24, seed=4)))
    port = free_port()
    args = ["--model", str(model_dir), "--port", str(port), "--dtype", "float32", "--num-kv-blocks", "96",
            "--no-progress", "--allowed-local-media-path", str(media), "--limit-mm-per-prompt", '{"image": 2}']
    with ServeProcess(args, port) as server:
        client = openai.OpenAI(base_url=server.base_url + "/v1", api_key="none", max_retries=0, timeout=60)
        offline = LLM(str(model_dir), dtype="float32", show_progress=False)
        yield client, client.models.list().data[0].id, offline, root


@pytest.fixture(scope="module")
def http_images():
    """A local HTTP server with one PNG at /a.png (other paths: 404)."""
    body = _png(random_image(40, 64, seed=5))

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            if self.path == "/a.png":
                self.send_response(200)
                self.send_header("Content-Type", "image/png")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
            else:
                self.send_error(404)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}", body
    server.shutdown()


def _ask(client, model, *urls, text="What is in these?"):
    parts = [{"type": "image_url", "image_url": {"url": u}} for u in urls] + [{"type": "text", "text": text}]
    return client.chat.completions.create(model=model, messages=[{"role": "user", "content": parts}], **GREEDY)


def _offline(offline, *images, text="What is in these?"):
    parts = [{"type": "image_pil", "image_pil": im} for im in images] + [{"type": "text", "text": text}]
    out = offline.chat([{"role": "user", "content": parts}],
                       SamplingParams(temperature=0.0, max_tokens=16, min_tokens=16))[0]
    return out.prompt_token_ids, out.outputs[0].token_ids


def test_data_urls_match_the_offline_api(served):
    client, model, offline, _ = served
    a, b = random_image(40, 56, seed=1), random_image(72, 48, seed=2)
    resp = _ask(client, model, _data_url(a), _data_url(b))
    prompt_ids, want = _offline(offline, a, b)
    assert resp.choices[0].model_extra["token_ids"] == want
    assert resp.usage.prompt_tokens == len(prompt_ids)


def test_local_file_and_http_url(served, http_images):
    from PIL import Image

    client, model, offline, root = served
    base, body = http_images
    resp = _ask(client, model, f"file://{root}/media/local.png", base + "/a.png")
    local = Image.open(root / "media" / "local.png")
    remote = Image.open(io.BytesIO(body))
    assert resp.choices[0].model_extra["token_ids"] == _offline(offline, local, remote)[1]


@pytest.mark.parametrize("url, message", [
    ("data:image/png;base64," + base64.b64encode(b"not an image").decode(), "cannot decode"),
    ("data:text/plain;base64,aGk=", "not an image"),
    ("http://127.0.0.1:9/x.png", "cannot fetch"),
    ("OUTSIDE", "outside --allowed-local-media-path"),
    ("ftp://example.invalid/a.png", "unsupported URL scheme"),
])
def test_bad_images_are_400s(served, url, message):
    client, model, _, root = served
    url = f"file://{root}/outside.png" if url == "OUTSIDE" else url
    with pytest.raises(openai.BadRequestError) as exc:
        _ask(client, model, url)
    err = exc.value.body
    assert message in err["message"] and err["type"] == "invalid_request_error"
    assert "Traceback" not in err["message"]


def test_http_404_and_too_many_images(served, http_images):
    client, model, _, _ = served
    base, _ = http_images
    with pytest.raises(openai.BadRequestError, match="HTTP 404"):
        _ask(client, model, base + "/missing.png")
    url = _data_url(random_image(24, 24, seed=9))
    with pytest.raises(openai.BadRequestError, match="at most 2 images"):
        _ask(client, model, url, url, url)
    assert _ask(client, model, url).choices[0].finish_reason == "length"  # still serving


def test_bench_random_mm_against_the_server(served, tmp_path):
    """`glmserve bench --dataset-name random-mm --backend openai-chat`: every request with its images served."""
    import argparse
    import json

    from glmserve.bench import cli

    client, model, _, _ = served
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    out = tmp_path / "mm.json"
    args = parser.parse_args([
        "--base-url", str(client.base_url).removesuffix("/v1/").removesuffix("/v1"), "--model", model,
        "--backend", "openai-chat", "--dataset-name", "random-mm", "--num-prompts", "6",
        "--random-input-len", "8", "--random-output-len", "4", "--random-mm-base-items-per-request", "1",
        "--random-mm-num-mm-items-range-ratio", "1.0", "--random-mm-limit-mm-per-prompt", '{"image": 2}',
        "--random-mm-bucket-config", "{(32, 48, 1): 0.5, (64, 40, 1): 0.5}", "--ignore-eos",
        "--disable-tqdm", "--result-file", str(out)])
    assert cli.run(args) == 0
    result = json.loads(out.read_text())
    assert result["completed"] == 6 and result["failed"] == 0
    assert result["total_input_tokens"] > 6 * 8  # the image tokens count too


def test_tokenize_refuses_image_parts(served):
    import httpx

    client, model, _, _ = served
    base = str(client.base_url).removesuffix("/").removesuffix("/v1")
    body = {"model": model, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": _data_url(random_image(24, 24, seed=1))}},
        {"type": "text", "text": "hi"}]}]}
    r = httpx.post(base + "/tokenize", json=body, timeout=30)
    assert r.status_code == 400 and "text parts only" in r.json()["error"]["message"]
    text_only = {"model": model, "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]}
    assert httpx.post(base + "/tokenize", json=text_only, timeout=30).json()["count"] > 0
