"""Which workers can be placed: the operator's rule (topology.place) and the CRD's CEL rule agree for every
tensorParallelSize the CRD accepts and every node size; what cannot be placed is refused with a message that
says why; names leave room for LeaderWorkerSet's suffixes."""

from __future__ import annotations

import pytest

from glmserve.operator import naming
from glmserve.operator.schema import openapi_schema
from glmserve.operator.spec import SpecError, check_owner_name, parse_spec
from glmserve.operator.topology import PlacementError, Topology, place
from tests.k8s_operator import crd_validation
from tests.k8s_operator.crd_validation import admit
from tests.k8s_operator.samples import GLM47_TWO_NODES, MINIMAL, glmd_object, with_changes

needs_cel = pytest.mark.skipif(crd_validation.celpy is None, reason="cel-python (dev dependency) is not installed")
TP_VALUES = openapi_schema()["properties"]["spec"]["properties"]["decode"]["properties"]["tensorParallelSize"]["enum"]


@pytest.mark.parametrize(("tp", "gpus_per_node", "expected"), [
    (1, 8, Topology(1, 1)), (4, 8, Topology(1, 4)), (8, 8, Topology(1, 8)), (16, 8, Topology(2, 8)),
    (16, 4, Topology(4, 4)), (16, 1, Topology(16, 1)), (8, 2, Topology(4, 2)), (16, 16, Topology(1, 16)),
    (4, 6, Topology(1, 4)),  # fits one 6-GPU node (two GPUs left for something else)
])
def test_valid_layouts(tp, gpus_per_node, expected):
    got = place(tp, tp, gpus_per_node)
    assert got == expected and got.nodes * got.gpus_per_pod == tp
    assert got.multi_node is (expected.nodes > 1)


@pytest.mark.parametrize(("tp", "gpus", "gpus_per_node", "message"), [
    (8, 8, 6, "tensorParallelSize 8 cannot be placed on nodes of 6 GPUs (gpusPerNode): it must fit on one node "
              "(at most 6) or fill whole nodes (a multiple of 6)"),
    (16, 16, 12, "cannot be placed on nodes of 12 GPUs"),
    (4, 4, 3, "a multiple of 3"),
    (8, 4, 8, "gpus (4) must equal tensorParallelSize (8)"),
    (2, 0, 8, "tensorParallelSize 2 needs GPUs"),
])
def test_unplaceable_layouts_say_why(tp, gpus, gpus_per_node, message):
    with pytest.raises(PlacementError, match=message.replace("(", r"\(").replace(")", r"\)")):
        place(tp, gpus, gpus_per_node)


def test_cpu_worker_is_one_pod_without_gpus():
    assert place(1, 0, 8) == Topology(1, 0)


@needs_cel
@pytest.mark.parametrize("gpus_per_node", [1, 2, 3, 4, 6, 8, 12, 16])
def test_crd_and_operator_agree_on_every_tensor_parallel_size(gpus_per_node):
    for tp in TP_VALUES:
        spec = with_changes(MINIMAL, ("decode", {"tensorParallelSize": tp, "gpus": tp, "gpusPerNode": gpus_per_node}))
        errors = admit(glmd_object(spec))
        try:
            topology = parse_spec(spec).decode.topology
        except SpecError as e:
            assert "decode: tensorParallelSize" in str(e)
            assert len(errors) == 1 and f"tensorParallelSize {tp} cannot be placed on nodes of {gpus_per_node} " \
                   "GPUs" in errors[0], errors  # messageExpression, with the numbers
        else:
            assert errors == [], (tp, gpus_per_node, errors)
            assert topology.nodes * topology.gpus_per_pod == tp and topology.gpus_per_pod <= gpus_per_node


@needs_cel
def test_crd_rejects_expert_parallel_without_tensor_parallel():
    spec = with_changes(MINIMAL, ("prefill", {"enableExpertParallel": True}))
    assert any("enableExpertParallel needs tensorParallelSize above 1" in e for e in admit(glmd_object(spec)))
    with pytest.raises(SpecError, match="prefill: enableExpertParallel needs tensorParallelSize above 1"):
        parse_spec(spec)
    ok = with_changes(MINIMAL, ("prefill", {"enableExpertParallel": True, "tensorParallelSize": 2, "gpus": 2}))
    assert admit(glmd_object(ok)) == []


def test_schema_bounds_gpus_per_node():
    for bad in (0, 17, "eight"):
        assert admit(glmd_object(with_changes(MINIMAL, ("decode.gpusPerNode", bad))), cel=False)


def _longest_names(owner: str) -> dict[str, str]:
    """The longest names and label values LWS and the StatefulSet controller derive from our LeaderWorkerSet."""
    lws = naming.lws_name(owner, "prefill")
    last_group, last_rank = 255, 15  # the CRD's replicas and tensorParallelSize bounds
    worker_sts = f"{lws}-{last_group}"
    return {"lws (its headless Service)": lws, "worker StatefulSet": worker_sts,
            "pod (hostname)": f"{worker_sts}-{last_rank}",
            "controller-revision-hash label": f"{worker_sts}-{'h' * 10}"}


def test_name_limit_leaves_room_for_lws_suffixes():
    assert naming.MAX_OWNER_NAME_MULTI_NODE == 36
    fits = _longest_names("a" * naming.MAX_OWNER_NAME_MULTI_NODE)
    assert all(len(v) <= 63 for v in fits.values()), fits
    one_more = _longest_names("a" * (naming.MAX_OWNER_NAME_MULTI_NODE + 1))
    assert len(one_more["controller-revision-hash label"]) > 63  # the bound is tight


@needs_cel
def test_long_names_are_refused_for_multi_node_roles_only():
    at_limit, over = "g" * 36, "g" * 37
    assert admit(glmd_object(GLM47_TWO_NODES, name=at_limit)) == []
    errors = admit(glmd_object(GLM47_TWO_NODES, name=over))
    assert any("at most 36 characters when a role spans several nodes" in e for e in errors), errors
    assert admit(glmd_object(MINIMAL, name="g" * 45)) == []  # one-node roles keep the 45-character limit
    spec = parse_spec(GLM47_TWO_NODES)
    check_owner_name(spec, at_limit)
    with pytest.raises(SpecError, match="at most 36 when a role spans several nodes \\(prefill, decode\\)"):
        check_owner_name(spec, over)
    check_owner_name(parse_spec(MINIMAL), "g" * 45)
