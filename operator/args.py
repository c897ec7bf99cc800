"""Command lines of the three services, from the spec (the flags of `glmserve prefill|decode|router`; a test
parses them with the real CLI parser)."""

from __future__ import annotations

from glmserve.operator import naming
from glmserve.operator.spec import DeploymentSpec, RoleSpec

# Pods listen on every interface (probes, the router and peers connect from outside the pod) and advertise
# their pod IP, which Kubernetes substitutes from the POD_IP variable (downward API) when it starts the container.
LISTEN_ALL = "0.0.0.0"
POD_IP_REF = "$(POD_IP)"
# In a group spanning nodes, LeaderWorkerSet gives every container the leader's DNS name and the pod's index in
# the group (0 = the leader) as environment variables; Kubernetes substitutes them into the args.
LWS_LEADER_ADDRESS_REF = "$(LWS_LEADER_ADDRESS)"
LWS_WORKER_INDEX_REF = "$(LWS_WORKER_INDEX)"


def speculative_args(spec: DeploymentSpec, role: RoleSpec) -> list[str]:
    """The role's own speculative settings; prefill workers also run MTP whenever the decode workers draft
    with it (they compute the MTP layer's KV over the prompt for them; a prefill worker without it is refused)."""
    e = role.engine
    d = spec.decode.engine
    if role.name == "prefill" and d.speculative_algorithm == "mtp":
        e = d
    return ["--speculative-algorithm", e.speculative_algorithm, "--speculative-num-steps", str(e.speculative_num_steps)]


def worker_args(spec: DeploymentSpec, role: RoleSpec, model_path: str) -> list[str]:
    e = role.engine
    args = [
        role.name, "--model", model_path, "--host", LISTEN_ALL, "--advertise-host", POD_IP_REF,
        "--grpc-port", str(naming.GRPC_PORT[role.name]), "--http-port", str(naming.HTTP_PORT[role.name]),
        "--served-model-name", spec.model_name,
        "--tensor-parallel-size", str(role.tensor_parallel_size),
        "--dtype", e.dtype, "--load-format", e.load_format,
        "--chunked-prefill-size", str(e.chunked_prefill_size),
        "--block-size", str(e.block_size),
        "--gpu-memory-utilization", str(e.kv_cache_memory_fraction),
        "--enable-prefix-caching" if e.enable_prefix_caching else "--no-enable-prefix-caching",
        f"--{role.name}-attention-backend", e.attention_backend,
        "--cuda-graph-max-batch-size", str(e.cuda_graph_max_batch_size),
        *speculative_args(spec, role),
        "--drain-timeout", str(role.drain_timeout_s),
        "--no-progress",  # no progress bars in pod logs
    ]
    for flag, value in (("--max-model-len", e.max_model_len), ("--max-num-batched-tokens", e.max_num_batched_tokens),
                        ("--max-num-seqs", e.max_num_seqs)):
        if value is not None:
            args += [flag, str(value)]
    if e.disable_cuda_graph:
        args.append("--disable-cuda-graph")
    if spec.kv_backend != "auto":  # auto is the services' own default; only an explicit choice is passed
        args += ["--kv-transfer-backend", spec.kv_backend]
    if role.name == "decode":
        args += ["--kv-port", str(spec.kv_port)]
    if role.enable_expert_parallel:
        args.append("--enable-expert-parallel")
    if role.topology.multi_node:  # SGLang's names for a group across nodes; the same args serve every pod of it
        args += ["--nnodes", str(role.topology.nodes), "--node-rank", LWS_WORKER_INDEX_REF,
                 "--dist-init-addr", f"{LWS_LEADER_ADDRESS_REF}:{naming.DIST_INIT_PORT}"]
    return args + list(e.extra_args)


def router_args(spec: DeploymentSpec, owner: naming.Owner, model_path: str) -> list[str]:
    r = spec.router
    args = [
        "router", "--model", model_path, "--host", LISTEN_ALL, "--port", str(r.http_port),
        "--served-model-name", spec.model_name,
        "--discovery", "kubernetes", "--namespace", owner.namespace,
        "--prefill-service", naming.role_name(owner.name, "prefill"),
        "--decode-service", naming.role_name(owner.name, "decode"),
        "--routing-policy", r.routing_policy,
    ]
    if r.tool_call_parser:
        args += ["--tool-call-parser", r.tool_call_parser]
    if r.reasoning_parser:
        args += ["--reasoning-parser", r.reasoning_parser]
    if r.request_timeout_s is not None:
        args += ["--request-timeout", str(r.request_timeout_s)]
    if spec.decode.engine.max_model_len is not None:  # the router rejects longer requests before they reach a worker
        args += ["--max-model-len", str(spec.decode.engine.max_model_len)]
    return args
