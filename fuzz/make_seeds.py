#!/usr/bin/env python3
"""Writes the committed seed inputs of the fuzz targets into fuzz/seeds/<target>/.

http_body: the real SDK requests of /work/shared/fixtures/sdk-wire (or $SDK_WIRE), each with the
selector byte of its route and encoding, plus a few single-message bodies. grpc_requests: small
hand-encoded protobuf requests. The others: hand-written JSON and identifiers, among them the
conditions and account computed traits of docs/tessera.example.toml. Run from the repository root; re-running rewrites them.
"""
import base64
import gzip
import json
import os
import pathlib

ROOT = pathlib.Path(__file__).resolve().parent / "seeds"
WIRE = pathlib.Path(os.environ.get("SDK_WIRE", "/work/shared/fixtures/sdk-wire"))

# The http_body selector: low bits the route (index into ROUTES), 0x80 gzip.
ROUTES = ["identify", "track", "page", "screen", "group", "alias", "batch"]


def put(target, name, data):
    d = ROOT / target
    d.mkdir(parents=True, exist_ok=True)
    (d / name).write_bytes(data)


# --- http_body ---------------------------------------------------------------------------------
for fixture in sorted(WIRE.glob("*.json")):
    doc = json.loads(fixture.read_text())
    for i, req in enumerate(doc["requests"]):
        route = req["path"].rsplit("/", 1)[-1]
        selector = ROUTES.index(route if route in ROUTES else "batch")
        body = base64.b64decode(req["raw_body_base64"])
        if (req.get("content_encoding") or "") == "gzip":
            selector |= 0x80
        put("http_body", f"{fixture.stem}-{i}", bytes([selector]) + body)
singles = {
    "track": {"userId": "u1", "event": "Order Completed", "properties": {"revenue": 42.5},
              "timestamp": "2026-01-01T00:00:00.123Z", "sentAt": "2026-01-01T00:00:01Z"},
    "identify": {"anonymousId": "a1", "traits": {"email": "Jane@Example.com", "n": [1, {"x": None}]},
                 "context": {"ip": "10.0.0.1"}, "writeKey": "k"},
    "alias": {"userId": "u1", "previousId": "a1", "messageId": 7},
}
for route, msg in singles.items():
    body = json.dumps(msg).encode()
    put("http_body", f"single-{route}", bytes([ROUTES.index(route)]) + body)
put("http_body", "single-track-gzip", bytes([0x80 | 1]) + gzip.compress(json.dumps(singles["track"]).encode(), mtime=0))
put("http_body", "bom-batch", bytes([6]) + b"\xef\xbb\xbf" + json.dumps(
    {"batch": [dict(singles["track"], type="track")], "sentAt": "2026-01-01T00:00:00+0000",
     "context": {"library": {"name": "x"}}}).encode())


# --- grpc_requests -----------------------------------------------------------------------------
def varint(n):
    out = bytearray()
    n &= (1 << 64) - 1
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def field(num, value):
    """A length-delimited field (bytes, str, or an encoded message)."""
    if isinstance(value, str):
        value = value.encode()
    return varint(num << 3 | 2) + varint(len(value)) + value


def num(num_, value):
    return varint(num_ << 3) + varint(value)


def struct(d):
    """google.protobuf.Struct of string/number/bool values."""
    out = b""
    for k, v in d.items():
        if isinstance(v, bool):
            val = num(4, int(v))
        elif isinstance(v, (int, float)):
            import struct as s
            val = varint(2 << 3 | 1) + s.pack("<d", float(v))
        else:
            val = field(3, v)
        out += field(1, field(1, k) + field(2, val))
    return out


def timestamp(seconds, nanos=0):
    return num(1, seconds) + (num(2, nanos) if nanos else b"")


track = (field(1, "m-1") + num(2, 2) + field(3, "u1") + field(5, "Order Completed")
         + field(10, struct({"revenue": 42.5, "currency": "EUR", "gift": True}))
         + field(14, timestamp(1_767_225_600, 5_000)))
identify = num(2, 1) + field(4, "a1") + field(11, struct({"email": "jane@example.com"}))
# Ingestion: selectors 0..15 (high bit clear).
put("grpc_requests", "ingest-events", bytes([0]) + field(1, track) + field(1, identify))
put("grpc_requests", "stream-ingest-events", bytes([1]) + field(1, identify))
put("grpc_requests", "create-source", bytes([2]) + field(1, "web") + num(2, 100) + num(3, 2))
put("grpc_requests", "update-source", bytes([8]) + field(1, "web") + num(2, 0) + num(3, 3))
plan = (field(1, field(1, "Order Completed") + field(2, json.dumps(
    {"type": "object", "properties": {"revenue": {"type": "number"}}, "required": ["revenue"]})))
        + field(4, '{"type":"object","properties":{"email":{"type":"string","format":"email"}}}')
        + num(6, 2))
put("grpc_requests", "put-tracking-plan", bytes([10]) + field(1, "web") + field(2, plan))
put("grpc_requests", "list-quarantined", bytes([11]) + field(1, "web") + num(2, 10)
    + field(3, base64.urlsafe_b64encode(b"id:5").rstrip(b"=")))
put("grpc_requests", "list-events", bytes([14]) + field(1, "web") + num(2, 20)
    + field(3, base64.urlsafe_b64encode(b"seq:9").rstrip(b"=")) + field(4, num(1, 2) + field(2, "x")))
# Profile: selectors 0x80.. (high bit set).
put("grpc_requests", "get-profile-id", bytes([0x80]) + field(1, "0190f8a0-0000-7000-8000-000000000001")
    + field(4, field(1, "traits.email") + field(1, "computed_traits")))
put("grpc_requests", "get-profile-identifier", bytes([0x80]) + field(2, field(1, "email") + field(2, "jane@example.com"))
    + field(3, timestamp(1_767_225_600)))
put("grpc_requests", "list-profile-events", bytes([0x85]) + field(1, "p1") + field(3, "track")
    + field(4, "Order Completed") + num(7, 10) + field(5, timestamp(1)) + field(6, timestamp(2)))
computed = field(1, "orders_30d") + num(2, 1) + field(3, "Order Completed") + num(6, 2_592_000)
put("grpc_requests", "create-computed-trait", bytes([0x80 | 11]) + field(1, computed))
audience = field(1, "engaged") + field(2, json.dumps(
    {"all": [{"performed": {"event": "Order Completed", "at_least": 2, "within_seconds": 60}},
             {"trait": {"name": "plan", "op": "in", "value": ["pro"]}}]}))
put("grpc_requests", "create-audience", bytes([0x80 | 16]) + field(1, audience))
put("grpc_requests", "update-audience", bytes([0x80 | 17]) + field(1, audience) + num(2, 3))
busy = field(1, "busy_accounts") + field(2, json.dumps(
    {"any": [{"account": {"name": "orders_30d", "op": "gte", "value": 3}},
             {"not": {"account": {"name": "industry", "op": "missing"}}}]}))
put("grpc_requests", "create-audience-account", bytes([0x80 | 16]) + field(1, busy))
put("grpc_requests", "replay-dead-letters", bytes([0x80 | 22]) + field(1, "crm") + field(2, varint(1) + varint(2)))

# --- identifiers -------------------------------------------------------------------------------
# Selector: bit 0 fold Gmail, bits 1-2 region (US, GB, DE, IN), bits 3-5 type (email, phone,
# user_id, anonymous_id, device_id, crm_id, loyalty_card, malformed); bit 7: rules JSON.
for name, selector, value in [
    ("email", 0 << 3, " Jane.Doe@Example.COM "),
    ("gmail-folded", 0 << 3 | 1, "J.a.n.e+news@googlemail.com"),
    ("phone-us", 1 << 3, "(415) 555-0100"),
    ("phone-gb", 1 << 3 | 1 << 1, "020 7946 0958"),
    ("phone-e164", 1 << 3 | 2 << 1, "+49 30 901820"),
    ("user-id-junk", 2 << 3, "undefined"),
    ("crm-blocked", 5 << 3, "000000"),
    ("unknown-type", 6 << 3, "card-1"),
    ("bad-type", 7 << 3, "x"),
]:
    put("identifiers", name, bytes([selector]) + value.encode())
put("identifiers", "rules-json", bytes([0x80]) + json.dumps({
    "custom_types": ["crm_id"], "email": {"fold_gmail": True}, "phone": {"default_region": "GB"},
    "blocklist": {"email": {"exact": ["test@example.com"], "regex": ["^.*@mailinator\\.com$"]}},
    "limits": {"email": {"max": 3, "window_seconds": 60}}}).encode())

# --- tracking_plan -----------------------------------------------------------------------------
SEP = b"\xff"
plan_doc = {
    "trackEvents": {"Order Completed": {
        "type": "object", "required": ["revenue"],
        "properties": {"revenue": {"type": "number", "minimum": 0},
                       "currency": {"type": "string", "pattern": "^[A-Z]{3}$"},
                       "items": {"type": "array", "items": {"type": "object",
                                  "properties": {"sku": {"type": "string"}}}}}}},
    "identifyTraits": {"type": "object", "properties": {"email": {"type": "string", "format": "email"}},
                       "additionalProperties": True},
    "pages": {"Home": {"type": "object", "maxProperties": 3}},
    "unplanned": "block",
}
put("tracking_plan", "order-completed-ok", json.dumps(plan_doc).encode() + SEP + json.dumps(
    {"type": "track", "userId": "u1", "event": "Order Completed",
     "properties": {"revenue": 1, "currency": "EUR", "items": [{"sku": "a"}]}}).encode())
put("tracking_plan", "order-completed-bad", json.dumps(plan_doc).encode() + SEP + json.dumps(
    {"type": "track", "userId": "u1", "event": "Order Completed",
     "properties": {"revenue": "1", "currency": "euro", "items": [{"sku": 1}]}}).encode())
put("tracking_plan", "unplanned", json.dumps(plan_doc).encode() + SEP + json.dumps(
    {"type": "track", "userId": "u1", "event": "Other"}).encode())
put("tracking_plan", "identify", json.dumps(plan_doc).encode() + SEP + json.dumps(
    {"type": "identify", "userId": "u1", "traits": {"email": "not an email"}}).encode())
put("tracking_plan", "refs", json.dumps({"groupTraits": {
    "$defs": {"n": {"type": "integer"}}, "properties": {"size": {"$ref": "#/$defs/n"}},
    "if": {"required": ["size"]}, "then": {"minProperties": 1}}}).encode() + SEP + json.dumps(
    {"type": "group", "userId": "u1", "groupId": "g", "traits": {"size": 3.5}}).encode())

# --- conditions --------------------------------------------------------------------------------
profile = json.dumps({"traits": {"plan": "pro", "email": "jane@example.com", "tags": ["a", "b"]},
                      "computed": {"lifetime_revenue": 1200, "audience:fuzz:0": 3},
                      "scores": {"engagement": 72.5}}).encode()
for name, definition in [
    ("engaged-buyers", {"all": [
        {"performed": {"event": "Order Completed", "at_least": 2, "within_seconds": 2592000}},
        {"trait": {"name": "plan", "op": "in", "value": ["pro", "team"]}},
        {"score": {"name": "engagement", "op": "gte", "value": 50}}]}),
    ("any-not", {"any": [{"not": {"trait": {"name": "churned", "op": "eq", "value": True}}},
                         {"computed": {"name": "lifetime_revenue", "op": "gt", "value": 1000}}]}),
    ("contains", {"trait": {"name": "tags", "op": "contains", "value": "b"}}),
    ("test", {"name": "plan", "op": "missing"}),
    ("computed-trait", {"name": "orders_30d", "kind": "count", "events": ["Order Completed"],
                        "window_seconds": 2592000}),
    ("bad-at-most", {"performed": {"event": "x", "at_least": 3, "at_most": 1}}),
]:
    put("conditions", name, json.dumps(definition).encode() + b"\xff" + profile)

# Account tests against the person's accounts: their traits and their account computed traits
# (declared in "account_computed" as [[profile.account_computed_traits]] takes them; a declared
# one wins over an account trait of its name), among them busy_accounts and the
# account_computed_traits of docs/tessera.example.toml.
orders_30d = {"name": "orders_30d", "kind": "count", "events": ["Order Completed"],
              "window_seconds": 2592000}
revenue = {"name": "revenue", "kind": "sum", "events": ["Order Completed"], "property": "total"}
accounts_profile = json.dumps({
    "traits": {"plan": "pro", "role": "finance"},
    "accounts": [
        {"id": "acme", "traits": {"industry": "Software", "orders_30d": 100, "employees": 50},
         "computed": {"orders_30d": 2, "revenue": 120.5}, "until": 2592000},
        {"id": "globex", "traits": {"industry": "Retail", "employees": 5000},
         "computed": {"orders_30d": 4}},
    ],
    "account_computed": [orders_30d, revenue],
}).encode()
for name, definition, prof in [
    ("account-busy-accounts", {"account": {"name": "orders_30d", "op": "gte", "value": 3}},
     accounts_profile),
    ("account-computed-and-traits", {"all": [
        {"account": {"name": "industry", "op": "eq", "value": "Software"}},
        {"not": {"account": {"name": "revenue", "op": "lt", "value": 100}}},
        {"trait": {"name": "role", "op": "eq", "value": "finance"}}]}, accounts_profile),
    ("account-undeclared-computed", {"account": {"name": "orders_30d", "op": "lte", "value": 2}},
     json.dumps({"accounts": [{"id": "acme", "traits": {"orders_30d": 1},
                               "computed": {"orders_30d": 9}}]}).encode()),
    ("account-none", {"any": [{"account": {"name": "industry", "op": "missing"}},
                              {"account": {"name": "orders_30d", "op": "ne", "value": 0}}]},
     json.dumps({"accounts": [], "account_computed": [orders_30d]}).encode()),
]:
    put("conditions", name, json.dumps(definition).encode() + b"\xff" + prof)
