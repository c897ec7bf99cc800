"""The command lines the operator and the chart write are ones the real `glmserve` CLI accepts, with ports and
names that match the manifests around them."""

from __future__ import annotations

import inspect

import pytest

from glmserve.operator import naming
from glmserve.operator.entry import run_operator
from glmserve.operator.manifests import build_all
from glmserve.operator.spec import parse_spec
from tests.k8s_operator.chart_render import by_kind, render
from tests.k8s_operator.lws_pods import pods_of
from tests.k8s_operator.samples import MULTI_NODE_SPECS, VALID_SPECS

cli = pytest.importorskip("glmserve.cli")

# Spec fields whose flag the services do not have yet; each is dropped before parsing, and listed in the report.
# Tensor/expert parallelism across pods and nodes (issue 9): the engine side adds these flags (SGLang's names).
PENDING_FLAGS: dict[str, int] = {"--enable-expert-parallel": 0, "--nnodes": 1, "--node-rank": 1, "--dist-init-addr": 1}
OWNER = naming.Owner("demo", "team-a", "uid")


def parse(args: list[str]):
    args = [a.replace("$(POD_IP)", "10.1.2.3") for a in args]
    for flag, nvalues in PENDING_FLAGS.items():
        if flag in args:
            i = args.index(flag)
            del args[i:i + 1 + nvalues]
    return cli.build_parser().parse_args(args)


@pytest.mark.parametrize("spec_name", sorted(VALID_SPECS))
def test_service_command_lines_parse(spec_name):
    ms = {(m["kind"], m["metadata"]["name"]): m
          for m in build_all(parse_spec(VALID_SPECS[spec_name]), OWNER, service_monitor_api=False)}
    for role in ("prefill", "decode"):
        c = ms[("Deployment", f"demo-{role}")]["spec"]["template"]["spec"]["containers"][0]
        assert c["command"] == ["glmserve"]
        a = parse(c["args"])
        ports = {p["name"]: p["containerPort"] for p in c["ports"]}
        assert (a.command, a.host, a.advertise_host) == (role, "0.0.0.0", "10.1.2.3")
        assert (a.grpc_port, a.http_port) == (ports["grpc"], ports["http"])
        assert c["readinessProbe"]["httpGet"]["port"] == "http"
        if role == "decode":
            assert a.kv_port == ports["kv"]
        svc_ports = {p["name"]: p["port"] for p in ms[("Service", f"demo-{role}")]["spec"]["ports"]}
        assert svc_ports["grpc"] == a.grpc_port  # the router dials EndpointSlice port "grpc"
    c = ms[("Deployment", "demo-router")]["spec"]["template"]["spec"]["containers"][0]
    a = parse(c["args"])
    assert (a.command, a.host, a.port) == ("router", "0.0.0.0", c["ports"][0]["containerPort"])
    assert (a.discovery, a.namespace, a.grpc_port_name) == ("kubernetes", "team-a", "grpc")
    assert ("Service", a.prefill_service) in ms and ("Service", a.decode_service) in ms


@pytest.mark.parametrize("spec_name", sorted(MULTI_NODE_SPECS))
def test_every_pod_of_a_group_runs_a_command_line_that_parses(spec_name):
    ms = {(m["kind"], m["metadata"]["name"]): m
          for m in build_all(parse_spec(MULTI_NODE_SPECS[spec_name]), OWNER, service_monitor_api=False)}
    groups = [m for (kind, _), m in ms.items() if kind == "LeaderWorkerSet"]
    assert groups
    for lws in groups:
        role = lws["metadata"]["labels"]["app.kubernetes.io/component"]
        for pod in pods_of(lws, replicas=2):
            a = parse(pod.args())  # $(LWS_*) and $(POD_IP) substituted as the kubelet does
            gpus = int(pod.env["LWS_GROUP_SIZE"]) * pod.container["resources"]["limits"]["nvidia.com/gpu"]
            assert (a.command, a.advertise_host, a.tensor_parallel_size) == (role, pod.ip, gpus)
            if pod.index == 0:
                ports = {p["name"]: p["containerPort"] for p in pod.container["ports"]}
                assert (a.grpc_port, a.http_port) == (ports["grpc"], ports["http"])


def test_pending_flags_are_only_emitted_when_asked_for():
    ms = build_all(parse_spec(VALID_SPECS["minimal"]), OWNER, service_monitor_api=False)
    assert not any(flag in str(m) for m in ms for flag in PENDING_FLAGS)


def test_chart_operator_command_parses():
    for values, scope in ((None, (None, True)), ({"operator": {"watchNamespace": "inference"}}, ("inference", False))):
        (dep,) = by_kind(render(values), "Deployment")
        c = dep["spec"]["template"]["spec"]["containers"][0]
        a = parse(c["args"])
        assert a.command == "operator" and (a.namespace, a.all_namespaces) == scope
        port = next(p["containerPort"] for p in c["ports"] if p["name"] == "health")
        assert port == inspect.signature(run_operator).parameters["liveness_port"].default


def test_speculative_settings_reach_both_roles_worker_configs(tmp_path):
    """MTP on the decode workers: both roles' pods get flags the CLI turns into an MTP engine config (the
    prefill workers compute the MTP layer's KV over the prompt for the decode workers)."""
    from glmserve.cli_args import worker_config
    from tests.k8s_operator.samples import MINIMAL

    spec = {**MINIMAL, "decode": {"engine": {"speculative": {"algorithm": "mtp", "numSteps": 2}}}}
    ms = {(m["kind"], m["metadata"]["name"]): m for m in build_all(parse_spec(spec), OWNER, service_monitor_api=False)}
    for role in ("prefill", "decode"):
        args = parse(ms[("Deployment", f"demo-{role}")]["spec"]["template"]["spec"]["containers"][0]["args"])
        engine = worker_config(args, role, tmp_path).engine
        assert (engine.speculative_algorithm, engine.speculative_num_steps) == ("mtp", 2), role
