"""Training metrics history: a Ray Train callback (runs in the Train controller, not the workers)
that keeps every report of rank 0 in `<run dir>/history.jsonl` on local disk or S3. A resumed run
appends to the same file, so loss curves span restarts; reports carry `resumed_from`."""

from __future__ import annotations

import json

from ray.train import UserCallback

from raytrain import storage


class HistoryCallback(UserCallback):
    def __init__(self, uri: str, opts: storage.StorageOptions | None = None):
        self.uri = uri
        self.opts = opts
        self._rows: list[dict] | None = None

    def _load(self) -> list[dict]:
        if self._rows is None:
            self._rows = read_history(self.uri, self.opts)
        return self._rows

    def after_report(self, run_context, metrics, checkpoint):
        rows = self._load()
        row = dict(metrics[0]) if metrics else {}
        row["node_ips"] = [m.get("node_ip") for m in metrics]  # where each rank ran
        if checkpoint is not None:
            row["checkpoint"] = checkpoint.path
        rows.append(row)
        fs = storage.fsspec_fs(self.uri, self.opts)
        path = storage.strip_scheme(self.uri)
        if not storage.is_s3(self.uri):
            fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        # Rewrite the whole (small) file: S3 objects cannot be appended to.
        with fs.open(path, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)


def read_history(uri: str, opts: storage.StorageOptions | None = None) -> list[dict]:
    if not storage.exists(uri, opts):
        return []
    with storage.fsspec_fs(uri, opts).open(storage.strip_scheme(uri), "r") as f:
        return [json.loads(line) for line in f if line.strip()]
