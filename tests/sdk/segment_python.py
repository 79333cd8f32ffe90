#!/usr/bin/env python3
"""Drives Tessera's HTTP tracking API with Segment's own Python library, unmodified.

Usage:
    segment_python.py --host http://127.0.0.1:PORT --write-key KEY --user-id ID --anonymous-id ID
                      [--gzip]

Makes one call of each kind for the user (identify, track, page, screen, group, alias), each
but the alias carrying a distinct `context.traits` value so the test can see every call in the
resulting profile, flushes, and exits 0 when the library reported no error (1 otherwise). The library
runs as configured by default (background consumer thread, batches to /v1/batch, Basic auth,
retries) apart from its host, and with its gzip option when --gzip is given.
"""

from __future__ import annotations

import argparse
import logging
import sys

from segment.analytics import Client


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", required=True)
    parser.add_argument("--write-key", required=True)
    parser.add_argument("--user-id", required=True)
    parser.add_argument("--anonymous-id", required=True)
    parser.add_argument("--gzip", action="store_true")
    args = parser.parse_args()

    logging.basicConfig(level=logging.WARNING)
    errors: list[tuple[str, int]] = []
    analytics = Client(
        args.write_key,
        host=args.host,
        gzip=args.gzip,
        on_error=lambda e, batch: errors.append((str(e), len(batch))),
    )

    user = args.user_id
    analytics.identify(
        user,
        {"email": f"{user}@example.com", "plan": "pro"},
        context={"traits": {"via_identify": True}},
    )
    analytics.track(
        user,
        "Order Completed",
        {"order_id": "o-1", "revenue": 42.5},
        context={"traits": {"via_track": True}},
    )
    analytics.page(
        user,
        "Docs",
        "Getting Started",
        {"url": "https://example.com/docs/start"},
        context={"traits": {"via_page": True}},
    )
    analytics.screen(user, "App", "Home", {"variant": "b"}, context={"traits": {"via_screen": True}})
    analytics.group(
        user,
        "group-789",
        {"name": "Example Inc", "employees": 12},
        context={"traits": {"via_group": True}},
    )
    analytics.alias(args.anonymous_id, user)
    analytics.shutdown()

    if errors:
        for message, size in errors:
            print(f"segment library error on a batch of {size}: {message}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
