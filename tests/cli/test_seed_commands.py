"""Every launch command of the guides in shared/seeds/ given to `glmserve serve` (paths, host and port
substituted): each flag lands on the setting it names, flags that cannot apply print a note, and flags we
cannot honour end the command with one line, under `glmserve serve`'s own usage."""

from __future__ import annotations

import pytest

from glmserve import cli
from glmserve.cli_args import engine_config, router_config
from glmserve.engine.cuda_graphs import capture_batch_sizes, chosen_batch_sizes
from glmserve.engine.tiny_model import build_tiny_model
from tests.cli.seed_commands import (LIGHTLLM, LIGHTLLM_MTP, VLLM_ASCEND, VLLM_FP8, VLLM_V, substitute, with_value,
                                     without)


@pytest.fixture(scope="module")
def flash_dir(tmp_path_factory):
    # Named like the guide's model directory: the served model name defaults to the directory's name.
    return build_tiny_model("glm4_moe_lite", tmp_path_factory.mktemp("seeds") / "GLM-4.7-Flash")


def _configs(words):
    args = cli._parse(["serve", *words])
    return args, engine_config(args, cli.cache_dir()), router_config(args, cli.cache_dir())


def _refused(words, capsys) -> str:
    with pytest.raises(SystemExit) as exc:
        cli._parse(["serve", *words])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    # One line, from the subcommand (not the top-level usage), pointing at the subcommand's own help.
    assert len(err.splitlines()) == 1 and err.startswith("glmserve serve: error: "), err
    assert "glmserve serve --help" in err
    return err


def test_lightllm_launch_maps_every_flag(flash_dir, capsys):
    _, eng, rc = _configs(substitute(LIGHTLLM, str(flash_dir) + "/", "0.0.0.0", 8000))
    assert eng.model.rstrip("/") == str(flash_dir) and rc.served_model_name == "GLM-4.7-Flash"
    assert eng.scheduler.max_model_len == 202752 and eng.scheduler.chunked_prefill_size == 8192
    assert (eng.prefill_attention_backend, eng.decode_attention_backend) == ("fa3", "flashinfer")
    assert eng.cuda_graph_max_batch_size == 512
    assert (rc.tool_call_parser, rc.reasoning_parser) == ("glm47", "glm45")
    assert (rc.host, rc.port) == ("0.0.0.0", 8000)
    assert capsys.readouterr().err == ""  # every flag has a meaning here: no notes


def test_lightllm_mtp_launch_turns_on_mtp(flash_dir, capsys):
    _, eng, _ = _configs(substitute(LIGHTLLM_MTP, str(flash_dir)))
    assert (eng.speculative_algorithm, eng.speculative_num_steps) == ("mtp", 4)
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("extra, message", [
    (["--mtp_step", "2", "--mtp_draft_model_dir", "/elsewhere"], "a separate draft model (/elsewhere) is not supported"),
    (["--mtp_step", "2", "--mtp_mode", "vanilla_no_att"], "eagle_with_att) only"),
    (["--speculative-config", '{"method": "eagle3", "num_speculative_tokens": 2}'], "only \"mtp\""),
    (["--speculative-config", '{"method": "mtp", "num_speculative_tokens": 9}'], "num_speculative_tokens must be"),
    (["--mtp-step", "7"], "--mtp-step 7: num_speculative_tokens must be an integer in 1..4"),
])
def test_bad_speculative_settings_fail_in_one_line(flash_dir, capsys, extra, message):
    assert message in _refused(["--model", str(flash_dir), *extra], capsys)


def test_vllm_ascend_launch(flash_dir, capsys):
    literal = substitute(VLLM_ASCEND, str(flash_dir))
    # MTP drafts with 16-way tensor parallelism are what stop it (no MTP across ranks yet)...
    with pytest.raises(SystemExit, match="tensor-parallel-size"):
        _configs(literal)
    # ...and on one device everything else is honoured, MTP with one draft token included.
    args, eng, rc = _configs(with_value(literal, "--tensor-parallel-size", "1"))
    assert (eng.speculative_algorithm, eng.speculative_num_steps) == ("mtp", 1)
    assert rc.served_model_name == "glm" and eng.seed == 1024
    assert eng.scheduler.max_model_len == 35000 and eng.scheduler.max_num_batched_tokens == 16384
    assert eng.scheduler.max_num_seqs == 16 and eng.cache.gpu_memory_utilization == 0.9
    assert eng.cuda_graph_capture_sizes == (1, 2, 4, 8, 16, 32) and eng.enable_cuda_graph
    err = capsys.readouterr().err
    assert "note: --trust-remote-code: accepted, no effect" in err and "note: --async-scheduling" in err


def test_vllm_fp8_launch_and_enforce_eager(flash_dir, capsys):
    words = with_value(substitute(VLLM_FP8, str(flash_dir)), "--tensor-parallel-size", "1")
    _, eng, rc = _configs(words)
    assert rc.served_model_name == "glm47-fp8" and eng.scheduler.max_model_len == 133000
    assert eng.enable_expert_parallel  # ours too (it partitions experts when --tensor-parallel-size > 1)
    assert eng.cuda_graph_capture_sizes == (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
    err = capsys.readouterr().err
    for flag in ("--async-scheduling", "--additional-config"):
        assert f"note: {flag}: accepted, no effect" in err
    assert "--enable-expert-parallel" not in err
    _, eager, _ = _configs(words + ["--enforce-eager"])
    assert not eager.enable_cuda_graph


def test_vllm_vision_guide_launch(flash_dir, capsys):
    _, eng, rc = _configs(with_value(substitute(VLLM_V, str(flash_dir)), "--tensor-parallel-size", "1"))
    assert (rc.tool_call_parser, rc.reasoning_parser) == ("glm45", "glm45")
    assert rc.allowed_local_media_path == "/"  # a real flag: image_url parts may name local files
    err = capsys.readouterr().err
    for flag in ("--enable-auto-tool-choice", "--mm-encoder-tp-mode", "--mm-processor-cache-type"):
        assert f"note: {flag}: accepted, no effect" in err
    assert "--allowed-local-media-path" not in err


@pytest.mark.parametrize("extra, message", [
    (["--bogus-flag", "1"], "unrecognized arguments: --bogus-flag 1"),
    (["--kv-cache-dtype", "fp8"], "nearest: --dtype"),
    (["--data-parallel-size", "2"], "nearest: `glmserve up --decode N`"),
    (["--compilation-config", "{not json"], "--compilation-config is not valid JSON"),
    (["--quantization", "fp8"], "quantization is read from the checkpoint"),
])
def test_unsupported_flags_fail_in_one_line_with_serve_usage(flash_dir, capsys, extra, message):
    assert message in _refused(["--model", str(flash_dir), *extra], capsys)


def test_flags_that_change_nothing_are_still_parsed(flash_dir):
    _, eng, _ = _configs([str(flash_dir), "--kv-cache-dtype", "auto", "--data-parallel-size", "1",
                          "--compilation-config", '{"cudagraph_mode": "NONE"}'])
    assert not eng.enable_cuda_graph  # cudagraph_mode NONE turns graphs off


def test_chat_template_file_or_text(flash_dir, tmp_path):
    path = tmp_path / "t.jinja"
    path.write_text("{% for m in messages %}{{ m.content }}{% endfor %}")
    _, _, from_file = _configs([str(flash_dir), "--chat-template", str(path)])
    assert from_file.chat_template == path.read_text()
    _, _, inline = _configs([str(flash_dir), "--chat-template", "{{ messages[0].content }}"])
    assert inline.chat_template == "{{ messages[0].content }}"
    with pytest.raises(SystemExit, match="not a valid Jinja template"):
        _configs([str(flash_dir), "--chat-template", "{% for %}"])


def test_capture_sizes_become_the_decode_buckets():
    assert chosen_batch_sizes(16, (32, 1, 2, 4, 8, 16)) == [1, 2, 4, 8, 16]  # capped by max_num_seqs, sorted
    assert chosen_batch_sizes(512, ()) == capture_batch_sizes(512)  # no sizes: the default ladder


def test_up_takes_the_same_spellings_and_hands_them_on(flash_dir):
    args = cli._parse(["up", "--model_dir", str(flash_dir), "--max_req_total_len", "300", "--enforce-eager",
                       "--metrics-compat", "vllm", "--api-key", "k", "--compilation-config",
                       '{"cudagraph_capture_sizes": [1, 2]}'])
    plan = cli.up_plan(args, str(flash_dir))
    workers, router = list(plan.worker_args), list(plan.router_args)
    assert workers[workers.index("--max-model-len") + 1] == "300" and "--disable-cuda-graph" in workers
    assert workers[workers.index("--metrics-compat") + 1] == "vllm"
    assert workers[workers.index("--cuda-graph-capture-sizes") + 1] == "1,2"
    assert router[router.index("--api-key") + 1] == "k"
