"""Generate the CustomResourceDefinitions from the pydantic models in `models`.

    python -m relay_operator.crdgen            # write crds/ and the chart's crds/
    python -m relay_operator.crdgen --check    # exit 1 if a committed file differs

Pydantic emits JSON Schema 2020-12; the API server wants a *structural* OpenAPI v3.0
schema: every node typed, no $ref, no anyOf/oneOf except int-or-string, numeric
exclusive bounds as booleans. `openapi()` does that translation and refuses a property
without a description, so `kubectl explain` documents every field.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import yaml

from relay_operator.models import CATEGORY, GROUP, KINDS, VERSION, Kind

REPO = Path(__file__).resolve().parents[2]
OUTPUT_DIRS = (REPO / "crds", REPO / "charts" / "smtp-relay-operator" / "crds")

# Keys the API server rejects or that mean nothing to it.
_DROPPED = {"title", "examples", "$defs"}


class SchemaError(ValueError):
    """The models cannot be expressed as a structural schema."""


def openapi(schema: dict[str, Any], defs: dict[str, Any], path: str = "") -> dict[str, Any]:
    """Translate one pydantic JSON-schema node (recursively) into structural OpenAPI."""
    node = _flatten(schema, defs)
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key in _DROPPED:
            continue
        if key == "properties":
            out[key] = {}
            for name, child in value.items():
                sub = openapi(child, defs, f"{path}.{name}")
                if not sub.get("description"):
                    raise SchemaError(f"{path}.{name} has no description")
                default = sub.get("default")
                if isinstance(default, str | int | float | bool) and default != "":
                    # `kubectl explain` shows descriptions but not defaults.
                    shown = str(default).lower() if isinstance(default, bool) else default
                    sub["description"] += f" Default: {shown}."
                out[key][name] = sub
        elif key == "items" or (key == "additionalProperties" and isinstance(value, dict)):
            out[key] = openapi(value, defs, f"{path}[]")
        elif key in ("exclusiveMinimum", "exclusiveMaximum") and not isinstance(value, bool):
            out[key.replace("exclusiveM", "m")] = value
            out[key] = True
        elif key == "const":
            out["enum"] = [value]
        else:
            out[key] = value
    if "default" in out and out["default"] is None:
        del out["default"]
    if "properties" in out or "additionalProperties" in out:
        out.setdefault("type", "object")
    if "type" not in out and not out.get("x-kubernetes-int-or-string"):
        raise SchemaError(f"{path or 'root'} has no type: {node}")
    # Type and description first: the order a reader of the YAML looks for them.
    first: dict[str, Any] = {k: out.pop(k) for k in ("type", "description") if k in out}
    return {**first, **out}


def _flatten(schema: dict[str, Any], defs: dict[str, Any]) -> dict[str, Any]:
    """Resolve $ref, single-item allOf and optional (`X | None`) into one plain node."""
    node = dict(schema)
    if "$ref" in node:
        target = defs[node.pop("$ref").rsplit("/", 1)[-1]]
        # The field's own keys (description, default) win over the model's docstring.
        node = {**_flatten(target, defs), **node}
    if "allOf" in node and len(node["allOf"]) == 1:
        node = {**_flatten(node.pop("allOf")[0], defs), **node}
    if "anyOf" in node:
        options = [o for o in node.pop("anyOf") if o.get("type") != "null"]
        types = {o.get("type") for o in options}
        if len(options) == 1:
            node = {**_flatten(options[0], defs), **node}
        elif types == {"integer", "string"} and node.get("x-kubernetes-int-or-string"):
            # Int-or-string is the one union a structural schema allows, in exactly this
            # form; a pattern beside it constrains the string form only.
            node["anyOf"] = [{"type": "integer"}, {"type": "string"}]
        else:
            raise SchemaError(f"unsupported union: {options}")
    return node


def schema_of(kind: Kind) -> dict[str, Any]:
    """The whole openAPIV3Schema of one kind."""
    spec = kind.spec.model_json_schema(by_alias=True)
    status = kind.status.model_json_schema(by_alias=True)
    root: dict[str, Any] = {
        "type": "object",
        "description": kind.description,
        "required": ["spec"],
        "properties": {
            "apiVersion": {
                "type": "string",
                "description": f"API version of this object: {GROUP}/{VERSION}.",
            },
            "kind": {"type": "string", "description": f"Kind of this object: {kind.kind}."},
            # The API server documents metadata itself and refuses anything added here.
            "metadata": {"type": "object"},
            "spec": openapi(spec, spec.get("$defs", {}), "spec"),
            "status": openapi(status, status.get("$defs", {}), "status"),
        },
    }
    root["properties"]["spec"]["description"] = kind.spec.__doc__ or kind.description
    root["properties"]["status"]["description"] = (
        kind.status.__doc__ or "Observed state, written by the operator."
    )
    if kind.rules:
        root["x-kubernetes-validations"] = list(kind.rules)
    return root


def crd(kind: Kind) -> dict[str, Any]:
    """The CustomResourceDefinition manifest for one kind."""
    columns = [
        {
            "name": c.name,
            "type": c.type,
            "jsonPath": c.json_path,
            "description": c.description,
            **({"priority": c.priority} if c.priority else {}),
        }
        for c in kind.columns
    ]
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": f"{kind.plural}.{GROUP}",
            "labels": {"app.kubernetes.io/part-of": "smtp-relay"},
        },
        "spec": {
            "group": GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": kind.kind,
                "listKind": f"{kind.kind}List",
                "plural": kind.plural,
                "singular": kind.singular,
                "shortNames": list(kind.short_names),
                "categories": [CATEGORY],
            },
            "versions": [
                {
                    "name": VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": columns,
                    "schema": {"openAPIV3Schema": schema_of(kind)},
                }
            ],
        },
    }


def peering_crds() -> list[dict[str, Any]]:
    """kopf's peering kinds, through which operator replicas see each other.

    Their shape is kopf's contract (group kopf.dev, v1, keep-alives in `status`, keyed by
    operator identity), so the schema keeps whatever kopf writes there.
    """
    result = []
    for kind, scope in (("ClusterKopfPeering", "Cluster"), ("KopfPeering", "Namespaced")):
        preserved = {"type": "object", "x-kubernetes-preserve-unknown-fields": True}
        result.append(
            {
                "apiVersion": "apiextensions.k8s.io/v1",
                "kind": "CustomResourceDefinition",
                "metadata": {"name": f"{kind.lower()}s.kopf.dev"},
                "spec": {
                    "group": "kopf.dev",
                    "scope": scope,
                    "names": {
                        "kind": kind,
                        "plural": f"{kind.lower()}s",
                        "singular": kind.lower(),
                    },
                    "versions": [
                        {
                            "name": "v1",
                            "served": True,
                            "storage": True,
                            "schema": {
                                "openAPIV3Schema": {
                                    "type": "object",
                                    "properties": {"spec": preserved, "status": preserved},
                                }
                            },
                        }
                    ],
                },
            }
        )
    return result


class _Dumper(yaml.SafeDumper):
    """Plain YAML: repeated sub-schemas written out, not as &anchors the reader must chase."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def _dump(documents: list[dict[str, Any]]) -> str:
    return yaml.dump_all(documents, Dumper=_Dumper, sort_keys=False, width=100)


_HEADER = "# Generated by `python -m relay_operator.crdgen` from relay_operator/models.py.\n"
_HEADER += "# Do not edit: change the models and regenerate.\n"


def render() -> dict[str, str]:
    """File name -> YAML text, for every CRD."""
    files = {f"{GROUP}_{kind.plural}.yaml": _HEADER + _dump([crd(kind)]) for kind in KINDS}
    files["kopf.dev_peerings.yaml"] = _HEADER + _dump(peering_crds())
    return files


def drift(directories: tuple[Path, ...] = OUTPUT_DIRS) -> list[str]:
    """Paths whose committed content differs from what the models generate."""
    expected = render()
    stale = []
    for directory in directories:
        present = {p.name for p in directory.glob("*.yaml")} if directory.is_dir() else set()
        for name, text in expected.items():
            path = directory / name
            if not path.is_file() or path.read_text() != text:
                stale.append(str(path))
        stale += [str(directory / n) for n in sorted(present - expected.keys())]
    return stale


def write(directories: tuple[Path, ...] = OUTPUT_DIRS) -> None:
    expected = render()
    for directory in directories:
        directory.mkdir(parents=True, exist_ok=True)
        for name, text in expected.items():
            (directory / name).write_text(text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="crdgen", description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if committed CRDs drift")
    args = parser.parse_args(argv)
    if args.check:
        stale = drift()
        for path in stale:
            print(f"out of date: {path}", file=sys.stderr)
        if stale:
            print("run: python -m relay_operator.crdgen", file=sys.stderr)
        return 1 if stale else 0
    write()
    return 0


if __name__ == "__main__":
    sys.exit(main())
