"""`prefect deploy --all` for this repository's prefect.yaml, with one upstream fix applied.

Prefect 3.8.8's CLI asks the server for the pool's online workers after creating each deployment,
sending `limit: null`, which the 3.8.8 server refuses (422); the CLI then stops after the first
deployment. Until that is fixed upstream, this runs the very same CLI command in-process with the
client sending the server's default page instead. Everything else is Prefect's own deploy.

    python -m flows.deploy            # what `make up` runs; any `prefect deploy` arguments work
"""

from __future__ import annotations

import sys
from typing import Any

from prefect.client.orchestration._work_pools.client import WorkPoolAsyncClient

_read_workers = WorkPoolAsyncClient.read_workers_for_work_pool


async def _read_workers_paged(
    self: WorkPoolAsyncClient,
    work_pool_name: str,
    worker_filter: Any = None,
    offset: int | None = None,
    limit: int | None = None,
) -> Any:
    return await _read_workers(self, work_pool_name, worker_filter, offset or 0, limit or 200)


def main(argv: list[str] | None = None) -> None:
    from prefect.cli import app

    WorkPoolAsyncClient.read_workers_for_work_pool = _read_workers_paged  # type: ignore[method-assign]
    args = argv if argv is not None else sys.argv[1:] or ["--all"]
    sys.argv = ["prefect", "--no-prompt", "deploy", *args]
    app()


if __name__ == "__main__":
    main()
