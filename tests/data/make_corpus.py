#!/usr/bin/env python3
"""Generates the bad-input corpus in tests/data/corpus/: one file per case (`NNN-name.bin`, or
`NNN-name.null` for a tombstone) and `cases.tsv` with each case's expected outcome:

  route:<route>   decoded and delivered by that route (routes of tests/corpus.rs)
  ignored         decoded, but no route takes its level
  dlq:<reason>    dead-lettered with that logbridge.error.reason
  skipped:tombstone  a null value: skipped (input.tombstones = "skip", the default)

Run it from anywhere; it rewrites the corpus. The files are committed, so tests need no Python.
"""
import json
import os
import shutil

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "corpus")
ROUTES = {"error": "errors", "fatal": "errors", "warning": "warnings",
          "info": "other", "debug": "other", "notice": "other"}
cases = []


def add(name, payload, expected):
    cases.append((name, payload, expected))


def event(**fields):
    return json.dumps(fields, ensure_ascii=False).encode()


def routed(level):
    return "route:" + ROUTES[level] if level in ROUTES else "ignored"


# Valid canonical events, level normalisation, unknown levels.
for level in ["error", "warning", "info", "debug", "fatal", "notice"]:
    add(f"valid-{level}", event(level=level, message=f"a {level} event", service="svc"), routed(level))
add("valid-full", event(level="error", code=503, message="upstream timeout", service="checkout",
                        ts="2026-11-27T10:00:00Z"), routed("error"))
add("norm-warn", event(level="warn", message="m"), routed("warning"))
add("norm-err", event(level="err", message="m"), routed("error"))
add("norm-upper", event(level="WARN", message="m"), routed("warning"))
add("norm-mixed", event(level="Error", message="m"), routed("error"))
add("unknown-level", event(level="verbose", message="m"), "ignored")
add("unicode-message", event(level="info", message="héllo wörld ✓ 日本語 🚀"), routed("info"))
add("escapes", b'{"level":"info","message":"tab\\t newline\\n quote\\" backslash\\\\ \\u00e9 \\ud83d\\ude80"}', routed("info"))
add("extra-fields", event(level="error", message="m", id=1, host="a", tags=["x", "y"],
                          ctx={"a": {"b": [1, 2, {"c": None}]}}), routed("error"))
add("null-optionals", b'{"level":"error","message":"m","code":null,"service":null,"ts":null}', routed("error"))
add("code-zero", event(level="error", message="m", code=0), routed("error"))
add("code-max-u32", event(level="error", message="m", code=4294967295), routed("error"))
add("pretty-printed", json.dumps({"level": "warning", "message": "multi\nline"}, indent=2).encode(), routed("warning"))
add("whitespace-around", b'  \n {"level":"info","message":"m"} \n ', routed("info"))
add("bom-prefix", b"\xef\xbb\xbf" + event(level="error", message="with bom"), routed("error"))
add("duplicate-unknown-field", b'{"level":"info","message":"m","x":1,"x":2}', routed("info"))
add("nested-100-in-unknown", b'{"level":"info","message":"m","deep":' + b"[" * 100 + b"]" * 100 + b"}", routed("info"))
add("big-under-decode-limit", event(level="error", message="x" * (1024 * 1024 - 1024)), "dlq:record_too_large")

# The seed article's serde form.
add("seed-error", b'{"Error":{"code":503,"message":"upstream timeout"}}', routed("error"))
add("seed-warning", b'{"Warning":{"message":"disk 91% full"}}', routed("warning"))
add("seed-info-extra", b'{"Info":{"message":"m","service":"s","id":7}}', routed("info"))
add("seed-fatal", b'{"Fatal":{"message":"m"}}', routed("fatal"))
add("seed-missing-message", b'{"Error":{"code":503}}', "dlq:missing_field")
add("seed-code-too-big", b'{"Error":{"code":4294967296,"message":"m"}}', "dlq:wrong_type")
add("seed-with-sibling", b'{"Error":{"message":"m"},"other":1}', "dlq:missing_field")
add("seed-not-object", b'{"Error":"boom"}', "dlq:missing_field")

# Empty, tombstone, whitespace, size.
add("empty", b"", "dlq:empty")
add("tombstone", None, "skipped:tombstone")
add("whitespace-only", b"   \n\t ", "dlq:not_json")
add("bom-only", b"\xef\xbb\xbf", "dlq:not_json")
add("over-decode-limit", event(level="error", message="x" * (1024 * 1024 + 16)), "dlq:too_large")

# Truncated JSON at every position of a small event.
full = event(level="error", message="truncated", code=500)
for cut in range(1, len(full), 2):
    add(f"truncated-{cut:02d}", full[:cut], "dlq:not_json")

# Other syntax errors.
for name, payload in [
    ("trailing-garbage", b'{"level":"info","message":"m"} x'),
    ("two-objects", b'{"level":"info","message":"m"}{"level":"info","message":"m"}'),
    ("single-quotes", b"{'level':'info','message':'m'}"),
    ("unquoted-keys", b'{level:"info",message:"m"}'),
    ("trailing-comma", b'{"level":"info","message":"m",}'),
    ("nan", b'{"level":"info","message":"m","x":NaN}'),
    ("comment", b'{"level":"info", /* c */ "message":"m"}'),
    ("bad-escape", b'{"level":"info","message":"\\q"}'),
    ("control-char", b'{"level":"info","message":"a\x01b"}'),
    ("lone-surrogate-escape", b'{"level":"info","message":"\\ud800"}'),
    ("huge-number", b'{"level":"error","message":"m","code":1e400}'),
    ("plain-text", b"ERROR upstream timeout"),
    ("xml", b"<log level='error'>m</log>"),
    ("just-brace", b"{"),
    # UTF-16 text of ASCII JSON is valid UTF-8 (NUL bytes and all), but not JSON.
    ("utf16-le", '{"level":"info","message":"m"}'.encode("utf-16-le")),
]:
    add(name, payload, "dlq:not_json")

# Invalid UTF-8.
for name, payload in [
    ("utf8-in-string", b'{"level":"info","message":"a\xffb"}'),
    ("utf8-in-key", b'{"lev\xc3el":"info","message":"m"}'),
    ("utf8-overlong", b'{"level":"info","message":"\xc0\xaf"}'),
    ("utf8-lone-continuation", b'{"level":"info","message":"\x80"}'),
    ("utf8-cesu-surrogate", b'{"level":"info","message":"\xed\xa0\x80"}'),
    ("utf8-truncated-sequence", b'{"level":"info","message":"\xe2\x82"}'),
    ("latin1", '{"level":"info","message":"café"}'.encode("latin-1")),
    ("binary", bytes(range(256))),
]:
    add(name, payload, "dlq:not_utf8")

# Nesting.
add("deep-10000-arrays", b"[" * 10000 + b"]" * 10000, "dlq:too_deep")
add("deep-10000-objects", b'{"a":' * 10000 + b"1" + b"}" * 10000, "dlq:too_deep")
add("deep-200-in-unknown", b'{"level":"info","message":"m","deep":' + b"[" * 200 + b"]" * 200 + b"}", "dlq:too_deep")

# Not an object.
for name, payload in [("array", b"[1,2,3]"), ("string", b'"error"'), ("number", b"42"),
                      ("true", b"true"), ("null", b"null"), ("array-of-events", b'[{"level":"info","message":"m"}]')]:
    add(f"top-{name}", payload, "dlq:not_object")

# Missing fields.
for name, payload in [("empty-object", b"{}"), ("no-level", b'{"message":"m"}'),
                      ("no-message", b'{"level":"error"}'), ("only-extra", b'{"id":1,"host":"h"}')]:
    add(f"missing-{name}", payload, "dlq:missing_field")

# Wrong types.
for name, payload in [
    ("code-too-big", b'{"level":"error","message":"m","code":4294967296}'),
    ("code-negative", b'{"level":"error","message":"m","code":-1}'),
    ("code-fraction", b'{"level":"error","message":"m","code":1.5}'),
    ("code-exponent", b'{"level":"error","message":"m","code":1e3}'),
    ("code-string", b'{"level":"error","message":"m","code":"503"}'),
    ("code-bool", b'{"level":"error","message":"m","code":true}'),
    ("code-huge", b'{"level":"error","message":"m","code":99999999999999999999}'),
    ("level-number", b'{"level":7,"message":"m"}'),
    ("level-null", b'{"level":null,"message":"m"}'),
    ("level-array", b'{"level":["error"],"message":"m"}'),
    ("level-object", b'{"level":{"name":"error"},"message":"m"}'),
    ("level-empty", b'{"level":"","message":"m"}'),
    ("message-number", b'{"level":"info","message":5}'),
    ("message-null", b'{"level":"info","message":null}'),
    ("message-object", b'{"level":"info","message":{"text":"m"}}'),
    ("service-number", b'{"level":"info","message":"m","service":1}'),
    ("ts-number", b'{"level":"info","message":"m","ts":1764237600}'),
]:
    add(f"type-{name}", payload, "dlq:wrong_type")

# Duplicate known fields.
for field, payload in [
    ("level", b'{"level":"error","level":"info","message":"m"}'),
    ("message", b'{"level":"error","message":"a","message":"b"}'),
    ("code", b'{"level":"error","message":"m","code":1,"code":2}'),
    ("service", b'{"level":"error","message":"m","service":"a","service":"b"}'),
]:
    add(f"duplicate-{field}", payload, "dlq:duplicate_field")

shutil.rmtree(OUT, ignore_errors=True)
os.makedirs(OUT)
with open(os.path.join(OUT, "cases.tsv"), "w") as tsv:
    tsv.write("# file\texpected (see tests/data/make_corpus.py)\n")
    for index, (name, payload, expected) in enumerate(cases):
        if payload is None:
            filename = f"{index:03d}-{name}.null"
            open(os.path.join(OUT, filename), "wb").close()
        else:
            filename = f"{index:03d}-{name}.bin"
            with open(os.path.join(OUT, filename), "wb") as f:
                f.write(payload)
        tsv.write(f"{filename}\t{expected}\n")
print(f"{len(cases)} cases written to {OUT}")
