#!/usr/bin/env python3
"""Writes one standalone, strict JSON schema per Kubernetes kind and version, in kubeconform's
file layout (`{kind}-{group}-{version}.json`, lowercased, with only the group's first label:
`deployment-apps-v1.json`, `service-v1.json`, `servicemonitor-monitoring-v1.json`), so that
`kubeconform -schema-location 'DIR/{{ .ResourceKind }}{{ .KindSuffix }}.json'` validates
offline.

    openapi2jsonschema.py k8s SWAGGER_JSON OUT_DIR
        every kind of the Kubernetes OpenAPI v2 document (api/openapi-spec/swagger.json of
        the k8s.io/kubernetes module)
    openapi2jsonschema.py crd SWAGGER_JSON OUT_DIR CRD_YAML...
        every served version of each CustomResourceDefinition (its openAPIV3Schema); the
        object's metadata is checked against ObjectMeta from SWAGGER_JSON, as the API server
        does

What each schema holds, and why:
- Standalone: the definitions a kind uses are copied under its own `definitions`, so the
  local `$ref`s resolve in the file itself (recursive types such as JSONSchemaProps stay
  finite) and nothing is fetched.
- Strict: an object with declared properties and no `additionalProperties` rejects any other
  field (`additionalProperties: false`), which is what the API server's field validation
  (`kubectl --validate=strict`) does: a misspelt or misplaced field fails here, not silently
  dropped at apply time. Objects marked `x-kubernetes-preserve-unknown-fields` stay open.
- The API server's own value conversions: an IntOrString (`format: int-or-string`,
  `x-kubernetes-int-or-string`) takes an integer or a string, a Quantity a number or a string,
  and a field may be null (the server treats null as unset; Helm writes null for an empty
  value).
- `apiVersion` and `kind` must name the schema's own kind and version.
Needs Python 3 and, for `crd`, PyYAML.
"""

import copy
import json
import os
import sys

DEF_PREFIX = "#/definitions/"
INT_OR_STRING = "io.k8s.apimachinery.pkg.util.intstr.IntOrString"
QUANTITY = "io.k8s.apimachinery.pkg.api.resource.Quantity"
OBJECT_META = "io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta"


def file_name(group, version, kind):
    """kubeconform's `{{ .ResourceKind }}{{ .KindSuffix }}.json` for group/version/kind."""
    first_label = group.split(".")[0] if group else ""
    suffix = f"-{first_label}-{version}" if first_label else f"-{version}"
    return f"{kind}{suffix}.json".lower()


def allow_null(schema):
    """A typed value may also be null (the API server reads null as unset)."""
    kind = schema.get("type")
    if isinstance(kind, str) and kind != "null":
        schema["type"] = [kind, "null"]


def tighten(schema):
    """Rewrites one schema node in place, then its children: strict objects, int-or-string,
    nullable values."""
    if not isinstance(schema, dict):
        return
    if schema.get("format") == "int-or-string" or schema.pop("x-kubernetes-int-or-string", False):
        for key in ("type", "format"):
            schema.pop(key, None)
        schema["anyOf"] = [{"type": "string"}, {"type": "integer"}]
    elif "properties" in schema and "additionalProperties" not in schema:
        if not schema.get("x-kubernetes-preserve-unknown-fields"):
            schema["additionalProperties"] = False
    allow_null(schema)
    for key in ("properties", "patternProperties", "definitions"):
        for child in schema.get(key, {}).values():
            tighten(child)
    for key in ("items", "additionalProperties", "not"):
        tighten(schema.get(key))
    for key in ("allOf", "anyOf", "oneOf"):
        for child in schema.get(key, []):
            tighten(child)


def referenced(node, found):
    """Names of the definitions `node` refers to, directly or not, added to `found`."""
    if isinstance(node, dict):
        ref = node.get("$ref")
        if isinstance(ref, str) and ref.startswith(DEF_PREFIX):
            found.append(ref[len(DEF_PREFIX):])
        for value in node.values():
            referenced(value, found)
    elif isinstance(node, list):
        for value in node:
            referenced(value, found)


def closure(definitions, roots):
    """Every definition reachable from `roots`, each once (cycles end where they meet)."""
    seen, queue = set(), list(roots)
    while queue:
        name = queue.pop()
        if name in seen:
            continue
        if name not in definitions:
            raise SystemExit(f"openapi2jsonschema: $ref to {name}, which the document lacks")
        seen.add(name)
        referenced(definitions[name], queue)
    return seen


def special_definitions(definitions):
    """The document's definitions with the API server's own conversions written in: a
    Quantity is a number or a string (`cpu: 1` and `cpu: 500m` are both taken)."""
    out = copy.deepcopy(definitions)
    if QUANTITY in out:
        description = out[QUANTITY].get("description", "")
        out[QUANTITY] = {
            "description": description,
            "anyOf": [{"type": "string"}, {"type": "number"}],
        }
    return out


def pin_kind(schema, group, version, kind):
    """`apiVersion` and `kind` must be this kind's own."""
    api_version = f"{group}/{version}" if group else version
    properties = schema.setdefault("properties", {})
    properties["apiVersion"] = {"type": "string", "enum": [api_version]}
    properties["kind"] = {"type": "string", "enum": [kind]}
    required = schema.setdefault("required", [])
    for key in ("apiVersion", "kind"):
        if key not in required:
            required.append(key)


def write(out_dir, group, version, kind, schema):
    path = os.path.join(out_dir, file_name(group, version, kind))
    with open(path, "w", encoding="utf-8") as out:
        json.dump(schema, out, indent=1, sort_keys=True)
        out.write("\n")
    return path


def from_swagger(swagger, out_dir):
    definitions = special_definitions(swagger["definitions"])
    written = 0
    for name in sorted(definitions):
        for gvk in definitions[name].get("x-kubernetes-group-version-kind", []):
            group, version, kind = gvk["group"], gvk["version"], gvk["kind"]
            root = copy.deepcopy(definitions[name])
            used = closure(definitions, [name]) - {name}
            root["definitions"] = {dep: copy.deepcopy(definitions[dep]) for dep in sorted(used)}
            tighten(root)
            pin_kind(root, group, version, kind)
            write(out_dir, group, version, kind, root)
            written += 1
    return written


def from_crds(swagger, out_dir, crd_files):
    import yaml  # only this mode reads YAML

    definitions = special_definitions(swagger["definitions"])
    meta = {dep: copy.deepcopy(definitions[dep]) for dep in closure(definitions, [OBJECT_META])}
    written = 0
    for crd_file in crd_files:
        with open(crd_file, encoding="utf-8") as source:
            documents = [doc for doc in yaml.safe_load_all(source) if doc]
        for crd in documents:
            if crd.get("kind") != "CustomResourceDefinition":
                continue
            group = crd["spec"]["group"]
            kind = crd["spec"]["names"]["kind"]
            for served in crd["spec"]["versions"]:
                if not served.get("served", True):
                    continue
                schema = served.get("schema", {}).get("openAPIV3Schema")
                if schema is None:
                    raise SystemExit(f"openapi2jsonschema: {crd_file}: {kind} {served['name']} has no openAPIV3Schema")
                root = copy.deepcopy(schema)
                tighten(root)
                root.setdefault("properties", {})["metadata"] = {"$ref": DEF_PREFIX + OBJECT_META}
                root["definitions"] = copy.deepcopy(meta)
                for child in root["definitions"].values():
                    tighten(child)
                pin_kind(root, group, served["name"], kind)
                write(out_dir, group, served["name"], kind, root)
                written += 1
    if written == 0:
        raise SystemExit("openapi2jsonschema: no CustomResourceDefinition found in " + " ".join(crd_files))
    return written


def main(argv):
    if len(argv) < 4 or argv[1] not in ("k8s", "crd") or (argv[1] == "crd" and len(argv) < 5):
        raise SystemExit(__doc__)
    mode, swagger_path, out_dir = argv[1], argv[2], argv[3]
    with open(swagger_path, encoding="utf-8") as source:
        swagger = json.load(source)
    os.makedirs(out_dir, exist_ok=True)
    if mode == "k8s":
        written = from_swagger(swagger, out_dir)
    else:
        written = from_crds(swagger, out_dir, argv[4:])
    print(f"openapi2jsonschema: {written} schemas written to {out_dir}", file=sys.stderr)


if __name__ == "__main__":
    main(sys.argv)
