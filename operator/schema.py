"""The GLMDeployment CRD as the operator sees it: loaded from crd.yaml (the single source) and used to fill in
defaults exactly as the API server does, so the builders never repeat a default value."""

from __future__ import annotations

import copy
import functools
from importlib import resources
from typing import Any

import yaml

GROUP = "glmserve.io"
VERSION = "v1alpha1"
PLURAL = "glmdeployments"
KIND = "GLMDeployment"
API_VERSION = f"{GROUP}/{VERSION}"


@functools.cache
def crd() -> dict[str, Any]:
    """The CustomResourceDefinition object (parsed once; callers must not mutate it)."""
    text = resources.files("glmserve.operator").joinpath("crd.yaml").read_text()
    return yaml.safe_load(text)


def openapi_schema() -> dict[str, Any]:
    """The openAPIV3Schema of the served version."""
    (version,) = [v for v in crd()["spec"]["versions"] if v["name"] == VERSION]
    return version["schema"]["openAPIV3Schema"]


def apply_defaults(schema: dict[str, Any], value: Any) -> Any:
    """Return a copy of `value` with the schema's defaults filled in.

    Structural defaulting as the API server does it: a missing property that has a `default` gets it, then
    defaulting continues inside it and inside every object or array item that is present.
    """
    value = copy.deepcopy(value)
    _default_in_place(schema, value)
    return value


def _default_in_place(schema: dict[str, Any], value: Any) -> None:
    if isinstance(value, dict):
        props = schema.get("properties", {})
        for name, sub in props.items():
            if name not in value and "default" in sub:
                value[name] = copy.deepcopy(sub["default"])
            if name in value:
                _default_in_place(sub, value[name])
        extra = schema.get("additionalProperties")
        if isinstance(extra, dict):
            for name, item in value.items():
                if name not in props:
                    _default_in_place(extra, item)
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for item in value:
            _default_in_place(schema["items"], item)


def defaulted_spec(spec: dict[str, Any]) -> dict[str, Any]:
    """A GLMDeployment spec with every CRD default applied."""
    return apply_defaults(openapi_schema()["properties"]["spec"], spec)
