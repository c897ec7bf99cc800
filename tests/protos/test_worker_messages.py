"""Round trips of the v1 worker messages and the shape of the two services."""

from glmserve.protos import worker_pb2 as pb
from glmserve.protos import worker_pb2_grpc as pb_grpc


def test_generate_request_round_trip() -> None:
    req = pb.GenerateRequest(
        request_id="req-1",
        prompt_token_ids=[151331, 151333, 9, 151552 - 1],
        sampling=pb.SamplingOptions(temperature=0.0, top_k=20, seed=-7, max_tokens=64,
                                    stop_token_ids=[151336], logprobs=0, eos_token_ids=[151329, 151336]),
        prefill_address="prefill-0:50061",
    )
    back = pb.GenerateRequest.FromString(req.SerializeToString())
    assert back == req
    assert list(back.prompt_token_ids) == [151331, 151333, 9, 151551]
    # Explicit zeros of `optional` fields survive: greedy and "sampled-token logprob only".
    assert back.sampling.HasField("temperature") and back.sampling.temperature == 0.0
    assert back.sampling.HasField("logprobs") and back.sampling.logprobs == 0
    assert not back.sampling.HasField("top_p")
    assert back.sampling.seed == -7


def test_token_chunk_with_error_status_round_trip() -> None:
    chunk = pb.TokenChunk(
        request_id="req-2",
        finish_reason=pb.FINISH_REASON_ERROR,
        status=pb.Status(code=pb.ERROR_CODE_NO_KV_CAPACITY, message="no KV capacity", retriable=True),
    )
    back = pb.TokenChunk.FromString(chunk.SerializeToString())
    assert back.status.retriable and back.status.code == pb.ERROR_CODE_NO_KV_CAPACITY
    assert back.finish_reason == pb.FINISH_REASON_ERROR
    assert not back.HasField("stop_token_id")


def test_token_chunk_logprobs_and_first_chunk_counts() -> None:
    chunk = pb.TokenChunk(
        request_id="r", token_ids=[5, 6], prompt_tokens=100, cached_prompt_tokens=64,
        logprobs=[pb.TokenLogprob(logprob=-0.5, rank=1, top_logprobs=[pb.TopLogprob(token_id=5, logprob=-0.5)]),
                  pb.TokenLogprob(logprob=-1.25, rank=2)],
        finish_reason=pb.FINISH_REASON_STOP, stop_token_id=151336,
    )
    back = pb.TokenChunk.FromString(chunk.SerializeToString())
    assert [lp.logprob for lp in back.logprobs] == [-0.5, -1.25]
    assert back.logprobs[0].top_logprobs[0].token_id == 5
    assert (back.prompt_tokens, back.cached_prompt_tokens, back.stop_token_id) == (100, 64, 151336)


def test_prefill_and_load_round_trip() -> None:
    req = pb.PrefillRequest(request_id="r", token_ids=list(range(40)), block_size=16,
                            kv_link=pb.KvLinkAddress(host="10.0.0.7", port=29600, link_id="decode-0/1"),
                            dst_block_ids=[3, 9, 4])
    assert pb.PrefillRequest.FromString(req.SerializeToString()).kv_link.port == 29600
    reply = pb.PrefillResponse(request_id="r", first_token_id=42, cached_tokens=32, kv_bytes_sent=2**40)
    assert pb.PrefillResponse.FromString(reply.SerializeToString()).kv_bytes_sent == 2**40
    big_hash = 2**64 - 1  # block hashes use the full uint64 range
    load = pb.LoadReport(role=pb.WORKER_ROLE_PREFILL, kv_usage=0.25, kv_stored_hashes=[big_hash, 1],
                         kv_removed_hashes=[big_hash - 1], kv_events_epoch=2**63 - 1, kv_events_seq=2**40,
                         state=pb.SERVING_STATE_DRAINING)
    back = pb.LoadReport.FromString(load.SerializeToString())
    assert list(back.kv_stored_hashes) == [big_hash, 1] and list(back.kv_removed_hashes) == [big_hash - 1]
    assert (back.kv_events_epoch, back.kv_events_seq) == (2**63 - 1, 2**40)
    assert back.role == pb.WORKER_ROLE_PREFILL and back.state == pb.SERVING_STATE_DRAINING


def test_services_expose_the_contract_methods() -> None:
    services = pb.DESCRIPTOR.services_by_name
    assert pb.DESCRIPTOR.package == "glmserve.v1"
    assert set(services["DecodeWorker"].methods_by_name) == {"Generate", "Cancel", "Health", "GetLoad"}
    assert set(services["PrefillWorker"].methods_by_name) == {"Prefill", "Cancel", "Health", "GetLoad"}
    generate = services["DecodeWorker"].methods_by_name["Generate"]
    assert generate.server_streaming and not generate.client_streaming
    assert not services["PrefillWorker"].methods_by_name["Prefill"].server_streaming
    assert hasattr(pb_grpc, "DecodeWorkerStub") and hasattr(pb_grpc, "add_PrefillWorkerServicer_to_server")
