"""The ``recfunnel`` command line.

    recfunnel run   [--config FILE] [--workdir DIR] [--set section.key=value ...]
    recfunnel query --workdir DIR --user-id ID [-k K] [--include-seen] [--cold-start]
    recfunnel serve --workdir DIR [--host 127.0.0.1] [--port 8500] [--follow promoted|latest] ...
    recfunnel stats --dataset NAME --data-dir DIR --output OUT [Beam pipeline options ...]
    recfunnel config [--config FILE] [--set ...]      print the resolved configuration

Exit codes (for schedulers such as cron, Airflow or Kubeflow):
  0  success (for `run`: the new version passed the quality gates and was promoted)
  1  the job failed while running (re-running resumes from the last finished stage)
  2  bad usage or configuration (nothing was done)
  3  bad input data (file, line and field are named)
  4  another run holds the workdir's lock (nothing was done; retry later)
  5  `run` finished but the quality gates blocked promotion (serving keeps the old version)
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
import tempfile
from typing import List, Optional

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_DATA, EXIT_LOCKED, EXIT_NOT_PROMOTED = 0, 1, 2, 3, 4, 5


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("absl", "tensorflow", "apache_beam", "h5py"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="recfunnel",
        description="Retrieval → pre-ranking → ranking pipeline for recommender systems: "
                    "Beam statistics, two-tower retrieval with logQ correction, SavedModel export, "
                    "ScaNN index, evaluation and top-k queries.",
        epilog="Exit codes: 0 ok, 1 job failed, 2 bad usage or configuration, 3 bad input data, "
               "4 workdir locked by another run, 5 run finished but not promoted by the quality gates.")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    run = sub.add_parser("run", help="run the whole job (default: the embedded synthetic data)")
    run.add_argument("--config", help="YAML config file (default: built-in defaults)")
    run.add_argument("--workdir", default="recfunnel-workdir", help="output directory (default: %(default)s)")
    run.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="override a config value, e.g. --set retrieval.epochs=3 (repeatable)")
    stages = run.add_mutually_exclusive_group()
    stages.add_argument("--from-stage", metavar="STAGE",
                        help="re-run this stage and all later ones (data, statistics, retrieval, ranker, "
                             "preranker, export, index, evaluation); by default unchanged stages are skipped")
    stages.add_argument("--only-stage", metavar="STAGE", help="run only this stage (its inputs must exist)")

    q = sub.add_parser("query", help="top-k items for a user from a workdir's exports")
    q.add_argument("--workdir", required=True)
    q.add_argument("--user-id", required=True)
    q.add_argument("-k", type=int, default=10, help="number of items (default: %(default)s)")
    q.add_argument("--include-seen", action="store_true", help="do not exclude the user's training items")
    q.add_argument("--cold-start", action="store_true",
                   help="answer unknown users with the cold-start embedding (unknown id, empty history)")
    q.add_argument("--version", type=int,
                   help="export version (default: the promoted one; before any promotion, the newest "
                        "complete one no quality gate rejected)")

    sv = sub.add_parser("serve", help="HTTP service over a workdir's exports (retrieval → pre-ranker → ranker)",
                        description="Serves POST /v1/recommend, POST /v1/retrieve, GET /v1/models, /healthz, "
                                    "/readyz (OpenAPI at /docs). New export versions are picked up while serving.")
    sv.add_argument("--workdir", required=True)
    sv.add_argument("--host", default="127.0.0.1", help="interface to bind (default: %(default)s, loopback only)")
    sv.add_argument("--port", type=int, default=8500, help="(default: %(default)s)")
    sv.add_argument("--version", type=int, help="serve only this export version (default: follow --follow)")
    sv.add_argument("--follow", choices=("promoted", "latest"), default="promoted",
                    help="which version to serve and reload: the promoted one, else the newest unrejected one "
                         "(default), or the newest complete one even when not promoted")
    sv.add_argument("--poll-interval", type=float, default=5.0,
                    help="seconds between checks for a new version; 0 = never reload (default: %(default)s)")
    sv.add_argument("--retrieval-candidates", type=int, default=1000, help="(default: %(default)s)")
    sv.add_argument("--preranker-candidates", type=int, default=200, help="(default: %(default)s)")
    sv.add_argument("--no-preranker", action="store_true", help="skip the pre-ranker even when exported")
    sv.add_argument("--no-ranker", action="store_true", help="skip the ranker even when exported")
    sv.add_argument("--max-k", type=int, default=100, help="largest k a request may ask for (default: %(default)s)")
    sv.add_argument("--max-body-bytes", type=int, default=65536, help="(default: %(default)s)")
    sv.add_argument("--max-batch-size", type=int, default=16,
                    help="concurrent requests answered by one batched cascade call; 1 = no batching "
                         "(default: %(default)s)")
    sv.add_argument("--batch-workers", type=int, default=2,
                    help="threads computing batches (default: %(default)s)")
    sv.add_argument("--batch-wait-ms", type=float, default=4.0,
                    help="how long a batch may wait for more requests, until it is as large as the previous "
                         "batch (a batch after a batch of one never waits); 0 = only those already waiting "
                         "(default: %(default)s)")
    sv.add_argument("--max-concurrent", type=int, default=0,
                    help="with --max-batch-size 1: cascades computed at once; more requests wait their turn "
                         "(default: 0 = no limit)")
    sv.add_argument("--tf-threads", type=int, default=0,
                    help="TensorFlow threads per operation (intra-op) in each process; 0 = one per core, divided "
                         "among the processes")
    sv.add_argument("--processes", type=int, default=1,
                    help="worker processes sharing the port, each with its own copy of the models (the Python "
                         "work of one process runs on about one core) (default: %(default)s)")
    sv.add_argument("--access-log", action="store_true", help="log every request")

    s = sub.add_parser("stats", help="Beam statistics of a dataset (item frequencies, vocabularies, MI)",
                       description="Runs the statistics job. Unrecognised options are Beam pipeline "
                                   "options, e.g. --runner=DirectRunner --direct_num_workers=2.")
    s.add_argument("--dataset", required=True,
                   help="synthetic, movielens, movielens_tfds, bars, csv or parquet")
    s.add_argument("--data-dir", default="", help="where the dataset's files are")
    s.add_argument("--output", required=True, help="output directory")
    s.add_argument("--config", help="YAML config for the data section (readers, split, synthetic size)")
    s.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    s.add_argument("--max-rejected-fraction", type=float, default=None)

    c = sub.add_parser("config", help="print the resolved configuration as YAML")
    c.add_argument("--config")
    c.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    if args.command != "stats" and extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if args.command is None:
        parser.print_help()
        return EXIT_USAGE
    _setup_logging(args.verbose)
    from pipeline.config import ConfigError, dump_config, load_config
    from pipeline.data.canonical import DataError
    from pipeline.orchestration import WorkdirLocked

    log = logging.getLogger("recfunnel")
    try:
        if args.command == "config":
            config = load_config(args.config, args.overrides)
            from pipeline.job import check_beam_flags
            check_beam_flags(config)  # what `run` checks before any work
            print(dump_config(config), end="")
            return EXIT_OK
        if args.command == "run":
            config = load_config(args.config, args.overrides)
            from pipeline.job import STAGES, run
            for flag, value in (("--from-stage", args.from_stage), ("--only-stage", args.only_stage)):
                if value is not None and value not in STAGES:
                    print(f"recfunnel: {flag} should be one of {', '.join(STAGES)}. Received: {value!r}",
                          file=sys.stderr)
                    return EXIT_USAGE
            metrics = run(config, args.workdir, from_stage=args.from_stage, only_stage=args.only_stage)
            keys = sorted(k for k in metrics
                          if k.startswith(("retrieval.", "index.", "baseline.", "ranker.", "preranker.")))
            print(json.dumps({k: round(metrics[k], 4) for k in keys} | {
                "workdir": os.path.abspath(args.workdir), "seconds": metrics["total_seconds"],
                "version": metrics["export_version"], "promoted": metrics["promotion"]["promote"],
                "skipped_stages": metrics["skipped_stages"]}, indent=2))
            return EXIT_NOT_PROMOTED if metrics["promotion"]["promote"] is False else EXIT_OK
        if args.command == "query":
            return _query(args)
        if args.command == "serve":
            return _serve(args)
        if args.command == "stats":
            return _stats(args, extra)
    except ConfigError as e:
        print(f"recfunnel: configuration error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except WorkdirLocked as e:
        print(f"recfunnel: {e}", file=sys.stderr)
        return EXIT_LOCKED
    except DataError as e:
        print(f"recfunnel: bad input data: {e}", file=sys.stderr)
        return EXIT_DATA
    except BrokenPipeError:
        # Whoever reads the output closed it early (`recfunnel query ... | head`): the command itself
        # succeeded. Point stdout at /dev/null so that the interpreter's final flush does not fail too.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
    except (OSError, ValueError) as e:
        log.debug("failure", exc_info=True)
        print(f"recfunnel: {e}", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_USAGE


def _query(args) -> int:
    from serving.recommender import Recommender
    from serving.user_store import UnknownUserError

    if args.k < 1:
        print(f"recfunnel: -k should be a positive integer. Received: {args.k}", file=sys.stderr)
        return EXIT_USAGE
    if not args.user_id.strip():
        print(f"recfunnel: --user-id should be a non-empty id. Received: {args.user_id!r}", file=sys.stderr)
        return EXIT_USAGE
    if not os.path.isdir(args.workdir):
        print(f"recfunnel: workdir not found: {args.workdir}", file=sys.stderr)
        return EXIT_USAGE
    try:  # nothing exported yet, no such version, every version turned down by its gate, or a damaged export
        rec = Recommender(args.workdir, args.version)
    except (OSError, ValueError) as e:  # BadRecordError, or parts of an export that do not belong together
        print(f"recfunnel: cannot load the export of {args.workdir}: {_describe_load_error(e)}", file=sys.stderr)
        return EXIT_USAGE
    try:
        out = rec.recommend(args.user_id, k=args.k, exclude_seen=not args.include_seen,
                            allow_unknown=args.cold_start)
    except UnknownUserError as e:
        print(f"recfunnel: {e}", file=sys.stderr)
        return EXIT_USAGE
    print(json.dumps(out, indent=2))
    return EXIT_OK


def _describe_load_error(e: Exception) -> str:
    """The error's message; a file-not-found error whose message is only the path (as pyarrow's) says so."""
    message = str(e)
    if isinstance(e, FileNotFoundError):
        if e.filename:
            return f"file not found: {e.filename}"
        if ": " not in message:  # a bare path (every message of ours says what is missing before a colon)
            return f"file not found: {message}"
    return message


def _serve(args) -> int:
    if os.path.exists(args.workdir) and not os.path.isdir(args.workdir):
        print(f"recfunnel: workdir {args.workdir} is a file, not a directory", file=sys.stderr)
        return EXIT_USAGE
    if not 0 <= args.port <= 65535:
        print(f"recfunnel: --port should be in [0, 65535]. Received: {args.port}", file=sys.stderr)
        return EXIT_USAGE
    from serving import exports
    from serving.cascade import CascadeConfig
    from serving.service import ServiceConfig, serve

    if args.version is not None and args.version not in exports.complete_versions(args.workdir):
        print(f"recfunnel: --version {args.version} is not a complete export of {args.workdir}; complete "
              f"versions: {exports.complete_versions(args.workdir)}", file=sys.stderr)
        return EXIT_USAGE

    try:
        config = ServiceConfig(
            workdir=args.workdir, version=args.version, follow=args.follow, poll_interval=args.poll_interval,
            max_k=args.max_k, max_body_bytes=args.max_body_bytes, max_concurrent=args.max_concurrent,
            max_batch_size=args.max_batch_size, batch_workers=args.batch_workers, batch_wait_ms=args.batch_wait_ms,
            cascade=CascadeConfig(retrieval_candidates=args.retrieval_candidates,
                                  preranker_candidates=args.preranker_candidates,
                                  use_preranker=not args.no_preranker, use_ranker=not args.no_ranker))
    except ValueError as e:  # named as the flags that set them
        message = re.sub(r"`(\w+)`|\b(\w+)=", lambda m: _as_flag(args, m), str(e))
        print(f"recfunnel: {message}", file=sys.stderr)
        return EXIT_USAGE
    if args.tf_threads < 0:
        print(f"recfunnel: --tf-threads should be >= 0. Received: {args.tf_threads}", file=sys.stderr)
        return EXIT_USAGE
    if args.processes < 1:
        print(f"recfunnel: --processes should be >= 1. Received: {args.processes}", file=sys.stderr)
        return EXIT_USAGE
    problem = _cannot_listen(args.host, args.port)
    if problem:  # before loading any model
        print(f"recfunnel: cannot listen on {args.host}:{args.port}: {problem}", file=sys.stderr)
        return EXIT_USAGE
    if not os.path.isdir(args.workdir):
        logging.getLogger("recfunnel").warning("workdir %s does not exist yet: serving waits for a version "
                                               "(503 until then)", args.workdir)
    try:
        serve(config, host=args.host, port=args.port, access_log=args.access_log,
              log_level="debug" if args.verbose else "info", processes=args.processes, tf_threads=args.tf_threads)
    except SystemExit as e:  # uvicorn exits when its startup fails (its message is logged)
        return EXIT_FAILED if e.code else EXIT_OK
    return EXIT_OK


def _as_flag(args, match) -> str:
    """`name` or name= of a ServiceConfig/CascadeConfig field as the `serve` flag that sets it."""
    name = match.group(1) or match.group(2)
    if not hasattr(args, name):
        return match.group(0)
    flag = "--" + name.replace("_", "-")
    return f"`{flag}`" if match.group(1) else f"{flag}="


def _cannot_listen(host: str, port: int) -> Optional[str]:
    """Why the service could not bind (host, port) now (in use, no such address), or None."""
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        return str(e.strerror or e)
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does
        try:
            sock.bind(address)
        except OSError as e:
            return e.strerror or str(e)
    return None


def _stats(args, pipeline_args: List[str]) -> int:
    fraction = args.max_rejected_fraction
    if fraction is not None and not 0.0 <= fraction <= 1.0:  # NaN too
        print(f"recfunnel: --max-rejected-fraction should be in [0, 1]. Received: {fraction}", file=sys.stderr)
        return EXIT_USAGE
    from beam_jobs.options import validate_pipeline_args
    from beam_jobs.stats_job import check_output_dir, run_statistics, stage_dataset, staging_dir
    from pipeline.config import load_config
    from pipeline.data.materialize import materialize
    from pipeline.job import read_source

    # Malformed rows go to the dead-letter file and count toward the threshold,
    # rather than stopping the reader at the first one (unless the config or --set says so).
    values = [("data.source", args.dataset, f"--dataset {args.dataset}")] + (
        [("data.path", args.data_dir, f"--data-dir {args.data_dir}")] if args.data_dir else [])
    config = load_config(args.config, list(args.overrides), values=values, defaults={"data.bad_rows": "skip"})
    if fraction is None:
        fraction = config.stats.max_rejected_fraction
    beam_args = list(config.stats.pipeline_args) + pipeline_args
    try:  # before any work: a typo costs nothing
        validate_pipeline_args(beam_args, {"output": args.output})
        check_output_dir(args.output.rstrip("/") or args.output, name="--output")
    except ValueError as e:  # a bad option, or an --output that is not replaceable
        print(f"recfunnel: {e}", file=sys.stderr)
        return EXIT_USAGE
    raw = read_source(config)
    remote = staging_dir(beam_args)  # Dataflow's workers read the dataset from Cloud Storage
    with tempfile.TemporaryDirectory(prefix="recfunnel-stats-") as tmp:
        data_dir = os.path.join(tmp, "data")
        read = materialize(raw, data_dir, config.data.split, config.data.positives, config.data.history_mode)
        if remote is not None:
            from apache_beam.io.filesystems import FileSystems

            logging.getLogger("recfunnel").info("copying the dataset to %s for the workers", remote)
            stage_dataset(data_dir, f"{remote}/data")
            data_dir = f"{remote}/data"
        try:
            # Too many rejected rows raise `TooManyRejectedRows`, a `DataError`: exit 3.
            summary = run_statistics(data_dir, args.output, pipeline_args=beam_args,
                                     min_count=config.stats.min_count, max_rejected_fraction=fraction,
                                     positives=read["positives"], upstream_rejections=read["read"],
                                     source=args.data_dir or raw.source, data_dir_is_temporary=True)
        finally:
            if remote is not None:
                try:  # the trailing slash: a directory (a prefix on Cloud Storage)
                    FileSystems.delete([remote.rstrip("/") + "/"])
                except Exception as e:  # noqa: BLE001  (never hide the job's own outcome)
                    logging.getLogger("recfunnel").warning("could not delete the staged dataset %s: %s", remote, e)
    print(json.dumps(summary, indent=2, default=str))
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
