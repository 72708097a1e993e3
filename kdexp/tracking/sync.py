"""``kdexp-sync``: send what a run's spool file kept (:mod:`kdexp.tracking.spool`) to its store."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from kdexp.tracking.spool import FILE_NAME, Spool
from kdexp.tracking.store import check_reachable, limit_http_retries


def main(argv: list[str] | None = None) -> int:
    """``kdexp-sync <run dir>``: send what a run could not send to its tracking store."""
    parser = argparse.ArgumentParser(
        prog="kdexp-sync",
        description="Send the metrics, tags, artifacts and final status that a kdexp run kept in "
        f"<run dir>/{FILE_NAME} while its tracking server was unreachable.",
    )
    parser.add_argument("run_dir", type=Path, help="the run's output folder (or the spool file)")
    parser.add_argument("--uri", help="send to this tracking URI instead of the run's own")
    args = parser.parse_args(argv)
    path = args.run_dir if args.run_dir.is_file() else args.run_dir / FILE_NAME
    if not path.is_file():
        print(f"kdexp-sync: error: {path} does not exist", file=sys.stderr)
        return 2
    header, spool = Spool.read(path)
    if not header:
        print(f"kdexp-sync: error: {path} has no header line", file=sys.stderr)
        return 2
    uri = args.uri or header["uri"]
    if not spool.pending:
        print(f"kdexp-sync: nothing to send; run {header['run_id']} at {uri} has everything")
        return 0
    from mlflow.tracking import MlflowClient

    limit_http_retries(uri)
    try:
        check_reachable(uri)
        count = spool.deliver(MlflowClient(tracking_uri=uri), header["run_id"])
    except Exception as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else repr(error)
        print(
            f"kdexp-sync: error: {len(spool.pending)} records not sent to {uri}: {reason}",
            file=sys.stderr,
        )
        return 1
    print(f"kdexp-sync: sent {count} records to run {header['run_id']} at {uri}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
