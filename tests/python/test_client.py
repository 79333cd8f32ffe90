#!/usr/bin/env python3
"""End-to-end check of Tessera's public gRPC contracts from a Python client.

Usage:
    test_client.py [--stubs DIR] [--timeout SECONDS] [--write-key KEY] ADDR
    test_client.py [--stubs DIR] --dry-run

ADDR is the host:port of a running Tessera gRPC endpoint (for example `tessera dev`), and KEY
(default: $TESSERA_WRITE_KEY) the write key of one of its sources, which `tessera dev` prints on
first start. The check sends an identify and a track event for a fresh user in one
IngestionService/IngestEvents call, then polls ProfileService/GetProfile by that user id until
the profile has both events, and checks its traits, its engagement score and that the anonymous
id is linked to it.

The stubs are generated from proto/ by gen_client.sh into a temporary directory, unless --stubs
names a directory it already generated into. --dry-run generates the stubs and builds the
requests without talking to a server, which proves the stubs and this script agree.

Exits 0 on success, 1 when a check fails, 2 on a usage error.
"""

from __future__ import annotations

import argparse
import importlib
import os
import subprocess
import sys
import tempfile
import time
import types
import uuid
from pathlib import Path

HERE = Path(__file__).resolve().parent

TRAITS = {"name": "Py User", "plan": "pro"}
REVENUE = 42.5
EXPECTED_EVENTS = 2


class CheckFailed(Exception):
    """A check of the server's behaviour failed; the message says which and why."""


def generate_stubs(out_dir: Path) -> None:
    env = dict(os.environ, PYTHON=sys.executable)
    subprocess.run(["bash", str(HERE / "gen_client.sh"), str(out_dir)], check=True, env=env)


def load_stubs(stubs_dir: Path) -> types.SimpleNamespace:
    sys.path.insert(0, str(stubs_dir))
    names = {
        "common": "tessera.common.v1.common_pb2",
        "ingestion": "tessera.ingestion.v1.ingestion_pb2",
        "ingestion_grpc": "tessera.ingestion.v1.ingestion_pb2_grpc",
        "profile": "tessera.profile.v1.profile_pb2",
        "profile_grpc": "tessera.profile.v1.profile_pb2_grpc",
    }
    return types.SimpleNamespace(**{k: importlib.import_module(v) for k, v in names.items()})


def timestamp(nanos: int):
    from google.protobuf.timestamp_pb2 import Timestamp

    ts = Timestamp()
    ts.FromNanoseconds(nanos)
    return ts


def struct(values: dict):
    from google.protobuf.struct_pb2 import Struct

    s = Struct()
    s.update(values)
    return s


def build_ingest_request(pb, user_id: str, anonymous_id: str):
    now = time.time_ns()
    identify = pb.common.Event(
        message_id=str(uuid.uuid4()),
        type=pb.common.EVENT_TYPE_IDENTIFY,
        user_id=user_id,
        anonymous_id=anonymous_id,
        traits=struct({**TRAITS, "email": f"{user_id}@example.com"}),
        # One second before the track, so the two events are ordered unambiguously.
        timestamp=timestamp(now - 1_000_000_000),
    )
    track = pb.common.Event(
        message_id=str(uuid.uuid4()),
        type=pb.common.EVENT_TYPE_TRACK,
        user_id=user_id,
        event="Order Completed",
        properties=struct({"revenue": REVENUE}),
        timestamp=timestamp(now),
    )
    return pb.ingestion.IngestEventsRequest(events=[identify, track])


def build_profile_request(pb, user_id: str):
    return pb.profile.GetProfileRequest(
        identifier=pb.common.Identifier(type="user_id", value=user_id)
    )


def ingest(pb, channel, channel_addr: str, write_key: str, request) -> None:
    import grpc

    stub = pb.ingestion_grpc.IngestionServiceStub(channel)
    try:
        response = stub.IngestEvents(
            request,
            timeout=15,
            wait_for_ready=True,
            metadata=[("x-tessera-write-key", write_key)],
        )
    except grpc.RpcError as e:
        hint = ""
        if e.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
            hint = f" (is Tessera serving gRPC at {channel_addr}?)"
        raise CheckFailed(f"IngestEvents failed: {e.code().name}: {e.details()}{hint}") from None
    if len(response.results) != len(request.events):
        raise CheckFailed(
            f"IngestEvents returned {len(response.results)} results for "
            f"{len(request.events)} events"
        )
    for i, result in enumerate(response.results):
        if result.status != pb.ingestion.EVENT_STATUS_ACCEPTED:
            status = pb.ingestion.EventStatus.Name(result.status)
            raise CheckFailed(f"IngestEvents: event {i} has status {status}, want ACCEPTED")
        if not result.event_id:
            raise CheckFailed(f"IngestEvents: event {i} has no event_id")


def wait_for_profile(pb, channel, request, timeout: float, access_token: str):
    """Polls GetProfile until the profile has EXPECTED_EVENTS events and its engagement score."""
    import grpc

    stub = pb.profile_grpc.ProfileServiceStub(channel)
    # The pipeline is asynchronous: the profile may not exist yet, or not have every event.
    retryable = {
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
    }
    deadline = time.monotonic() + timeout
    last = "no answer yet"
    while True:
        try:
            profile = stub.GetProfile(
                request,
                timeout=5,
                metadata=[("authorization", f"Bearer {access_token}")],
            ).profile
        except grpc.RpcError as e:
            if e.code() not in retryable:
                raise CheckFailed(f"GetProfile failed: {e.code().name}: {e.details()}") from None
            last = f"{e.code().name}: {e.details()}"
        else:
            # Scores are stored just after the events are applied: wait for both.
            if profile.event_count == EXPECTED_EVENTS and "engagement" in profile.scores:
                return profile
            if profile.event_count > EXPECTED_EVENTS:
                raise CheckFailed(
                    f"profile {profile.profile_id} has event_count {profile.event_count}, "
                    f"want {EXPECTED_EVENTS} (events applied twice?)"
                )
            last = f"event_count {profile.event_count}"
        if time.monotonic() >= deadline:
            raise CheckFailed(
                f"GetProfile by user_id {request.identifier.value}: event_count did not reach "
                f"{EXPECTED_EVENTS} within {timeout:g} s (last: {last})"
            )
        time.sleep(0.25)


def check_profile(profile, anonymous_id: str) -> None:
    from google.protobuf import json_format, text_format

    problems = []
    for name, want in TRAITS.items():
        if name not in profile.traits:
            problems.append(f"trait {name!r} is missing")
            continue
        got = json_format.MessageToDict(profile.traits[name].value)
        if got != want:
            problems.append(f"trait {name!r} is {got!r}, want {want!r}")
    engagement = profile.scores.get("engagement")
    if engagement is None:
        problems.append(f"no 'engagement' score (scores: {sorted(profile.scores)})")
    elif not engagement.value > 0:
        problems.append(f"'engagement' score is {engagement.value}, want > 0")
    if not any(i.type == "anonymous_id" and i.value == anonymous_id for i in profile.identifiers):
        ids = [f"{i.type}:{i.value}" for i in profile.identifiers]
        problems.append(f"anonymous_id {anonymous_id} is not among the identifiers {ids}")
    if problems:
        raise CheckFailed(
            f"profile {profile.profile_id} is not as expected:\n  - "
            + "\n  - ".join(problems)
            + "\nprofile:\n"
            + text_format.MessageToString(profile, indent=2)
        )


def run(args: argparse.Namespace, stubs_dir: Path) -> None:
    pb = load_stubs(stubs_dir)
    suffix = uuid.uuid4().hex[:12]
    user_id = f"py-user-{suffix}"
    anonymous_id = f"py-anon-{suffix}"
    ingest_request = build_ingest_request(pb, user_id, anonymous_id)
    profile_request = build_profile_request(pb, user_id)

    if args.dry_run:
        from google.protobuf import text_format

        print("dry run: stubs import and the requests build; nothing sent")
        print("IngestEventsRequest:\n" + text_format.MessageToString(ingest_request, indent=2))
        print("GetProfileRequest:\n" + text_format.MessageToString(profile_request, indent=2))
        return

    import grpc

    with grpc.insecure_channel(args.addr) as channel:
        ingest(pb, channel, args.addr, args.write_key, ingest_request)
        print(f"ingested identify + track for {user_id} at {args.addr}")
        started = time.monotonic()
        profile = wait_for_profile(
            pb, channel, profile_request, args.timeout, args.access_token
        )
        check_profile(profile, anonymous_id)
    print(
        f"ok: profile {profile.profile_id} of {user_id} has {profile.event_count} events, "
        f"traits {sorted(TRAITS)}, engagement {profile.scores['engagement'].value:.2f} "
        f"and {anonymous_id} linked (after {time.monotonic() - started:.1f} s)"
    )


def main() -> int:
    parser = argparse.ArgumentParser(
        description="Check Tessera's ingestion and profile APIs end to end from Python."
    )
    parser.add_argument("addr", nargs="?", help="host:port of Tessera's gRPC endpoint")
    parser.add_argument("--stubs", type=Path, help="directory gen_client.sh generated into")
    parser.add_argument(
        "--timeout", type=float, default=20.0, help="seconds to wait for the profile (20)"
    )
    parser.add_argument(
        "--dry-run", action="store_true", help="generate stubs and build requests only"
    )
    parser.add_argument(
        "--write-key",
        default=os.environ.get("TESSERA_WRITE_KEY", ""),
        help="write key of a source (default: $TESSERA_WRITE_KEY)",
    )
    parser.add_argument(
        "--access-token",
        default=os.environ.get("TESSERA_ACCESS_TOKEN", ""),
        help="access token with the scope profiles:read (default: $TESSERA_ACCESS_TOKEN)",
    )
    args = parser.parse_args()
    if not args.dry_run and not args.access_token:
        parser.error("--access-token (or TESSERA_ACCESS_TOKEN) is required unless --dry-run is given")
    if not args.dry_run and not args.addr:
        parser.error("ADDR is required unless --dry-run is given")
    if not args.dry_run and not args.write_key:
        parser.error("--write-key (or TESSERA_WRITE_KEY) is required unless --dry-run is given")

    try:
        if args.stubs is not None:
            run(args, args.stubs)
        else:
            with tempfile.TemporaryDirectory(prefix="tessera-pystubs-") as tmp:
                generate_stubs(Path(tmp))
                run(args, Path(tmp))
    except CheckFailed as e:
        print(f"FAIL: {e}", file=sys.stderr)
        return 1
    except subprocess.CalledProcessError as e:
        print(f"FAIL: generating the stubs failed ({e})", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
