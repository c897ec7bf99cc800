"""Check a GLMDeployment against the CRD's openAPIV3Schema the way the API server would: apply the defaults,
validate the structural schema (jsonschema), then evaluate every x-kubernetes-validations CEL rule (cel-python)
on the value it is attached to."""

from __future__ import annotations

import copy
from typing import Any

import jsonschema

from glmserve.operator.schema import apply_defaults, openapi_schema

try:
    import celpy
except ImportError:  # cel-python is a dev dependency; without it only the structural schema is checked
    celpy = None


def to_json_schema(node: Any) -> Any:
    """OpenAPI v3 (Kubernetes structural subset) -> JSON Schema: the keywords coincide except these."""
    if isinstance(node, list):
        return [to_json_schema(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {k: to_json_schema(v) for k, v in node.items()
           if k not in ("x-kubernetes-validations", "nullable", "x-kubernetes-list-type",
                        "x-kubernetes-list-map-keys", "x-kubernetes-preserve-unknown-fields", "x-kubernetes-int-or-string")}
    if node.get("x-kubernetes-int-or-string"):
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if node.get("format") == "date-time":
        out.pop("format")  # jsonschema's format checking is opt-in anyway; keep the schema plain
    return out


def schema_errors(obj: dict[str, Any]) -> list[str]:
    validator = jsonschema.Draft202012Validator(to_json_schema(openapi_schema()))
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(obj)]


def cel_errors(obj: dict[str, Any]) -> list[str]:
    """Messages of the CEL rules that evaluate false (or fail) on `obj`."""
    if celpy is None:
        raise RuntimeError("cel-python is not installed")
    env = celpy.Environment()
    failures: list[str] = []

    def message(rule: dict[str, Any], value: Any) -> str:
        """messageExpression when it evaluates to a string (as the API server does), else message."""
        if "messageExpression" in rule:
            try:
                text = env.program(env.compile(rule["messageExpression"])).evaluate({"self": celpy.json_to_cel(value)})
                if isinstance(text, str):
                    return str(text)
            except Exception:
                pass
        return rule["message"]

    def walk(schema: dict[str, Any], value: Any, path: str) -> None:
        for rule in schema.get("x-kubernetes-validations", []):
            program = env.program(env.compile(rule["rule"]))
            try:
                ok = program.evaluate({"self": celpy.json_to_cel(value)})
            except Exception as e:  # a missing field is an evaluation error, reported like a failed rule
                ok = False
                failures.append(f"{path}: {rule['message']} (error: {e})")
                continue
            if isinstance(ok, celpy.CELEvalError) or not bool(ok):
                failures.append(f"{path}: {message(rule, value)}")
        if isinstance(value, dict):
            for name, sub in (schema.get("properties") or {}).items():
                if name in value:
                    walk(sub, value[name], f"{path}.{name}")
        elif isinstance(value, list) and isinstance(schema.get("items"), dict):
            for i, item in enumerate(value):
                walk(schema["items"], item, f"{path}[{i}]")

    walk(openapi_schema(), obj, "")
    return failures


def admit(obj: dict[str, Any], *, cel: bool = True) -> list[str]:
    """All reasons the API server would reject `obj` (empty: accepted). Defaults are applied first."""
    defaulted = apply_defaults(openapi_schema(), copy.deepcopy(obj))
    errors = schema_errors(defaulted)
    if not errors and cel:
        errors = cel_errors(defaulted)
    return errors
