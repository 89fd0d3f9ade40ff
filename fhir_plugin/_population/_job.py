"""The population job on Apache Spark: NDJSON in, one worklist row per patient out (Parquet + JSON lines).

Spark carries the check, it does not reimplement it: every line is keyed by its
patient with ``_rows.key_line``, the lines are grouped by patient, and each group
goes through ``_rows.patient_row`` (the one review pipeline) in an Arrow-based
grouped map (``applyInPandas``).  Only the DataFrame API is used, so the same job
runs in local mode (the default), on a standalone or YARN/Kubernetes master, and
through Spark Connect.

Line numbers: each file is read whole (``wholetext``) and split with its positions,
so a problem names its file and line; bulk servers split their output into files of
bounded size, and ``sandbox.population`` writes files of 1,000 patients.

Nothing half-written: Parquet goes to a temporary folder renamed into place at the
end, JSON lines likewise; a job that dies leaves the previous results or none.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import date, datetime
from pathlib import Path
from typing import Any

from .._errors import UsageError
from ._rows import READ_TYPES, ROW_COLUMNS, key_line, patient_row, problem_row

__all__ = ["SparkSettings", "spark_session", "run_population", "PopulationResult", "ROW_SCHEMA", "ndjson_files"]

#: the Spark schema of a worklist row (``_rows.ROW_COLUMNS`` in order)
ROW_SCHEMA = (
    "patient string, encounter string, complete boolean, code_fit string, suggested array<string>, "
    "gaps array<string>, red_flags array<string>, referral boolean, drafts_allowed boolean, "
    "refused string, statuses string, flag_statuses string, problem string, drafts string"
)
_KEYED_SCHEMA = "file string, line long, patient string, text string, problem string"


@dataclass(frozen=True)
class SparkSettings:
    """Where the job runs: ``master`` (default ``local[*]``), or a Spark Connect ``remote`` URL."""

    master: str | None = None
    remote: str | None = None
    shuffle_partitions: int | None = None
    driver_memory: str | None = None


@dataclass(frozen=True)
class PopulationResult:
    parquet: Path
    jsonl: Path
    patients: int
    problems: list[dict[str, Any]]


def _loopback(master: str) -> bool:
    return master.startswith("local") or "127.0.0.1" in master or "localhost" in master


def spark_session(settings: SparkSettings = SparkSettings()) -> Any:
    """A SparkSession (the active one if there is one, so tests and notebooks share it)."""
    from pyspark.sql import SparkSession

    if settings.master and settings.remote:
        raise UsageError("give either --master or --remote (Spark Connect), not both")
    # executors run the check in this interpreter's environment (where fhir_plugin is installed)
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
    builder = SparkSession.builder.appName("fhir-plugin population")
    if settings.remote:
        return builder.remote(settings.remote).getOrCreate()
    if settings.master is None and "PYSPARK_GATEWAY_PORT" in os.environ:
        # started by spark-submit: its --master and --conf already hold, and must not be overridden
        return builder.getOrCreate()
    master = settings.master or "local[*]"
    builder = builder.master(master)
    if _loopback(master):
        builder = builder.config("spark.driver.host", "127.0.0.1").config("spark.driver.bindAddress", "127.0.0.1")
    if settings.driver_memory:
        builder = builder.config("spark.driver.memory", settings.driver_memory)
    session = (
        builder.config("spark.ui.enabled", "false")
        .config("spark.ui.showConsoleProgress", "false")
        .config("spark.sql.shuffle.partitions", str(settings.shuffle_partitions or os.cpu_count() or 2))
        .config("spark.sql.execution.arrow.pyspark.enabled", "true")
        # workers forked with the check already loaded (see _daemon)
        .config("spark.python.daemon.module", "fhir_plugin._population._daemon")
        .getOrCreate()
    )
    session.sparkContext.setLogLevel("ERROR")  # the summary is the output; Spark's warnings are noise there
    return session


def ndjson_files(folder: str | Path) -> list[Path]:
    """The ``.ndjson`` files of a folder (the bulk tools' output), sorted; none is a UsageError."""
    root = Path(folder)
    if not root.is_dir():
        raise UsageError(f"--ndjson wants a folder of .ndjson files; {root} is not a folder")
    files = sorted(p for p in root.iterdir() if p.is_file() and p.name.endswith(".ndjson"))
    if not files:
        raise UsageError(f"{root} holds no .ndjson files")
    return files


#: what the JVM reads of a line to find its patient (the rest of the line is left to the check)
_KEY_FIELDS = "resourceType string, id string, subject struct<reference: string>, patient struct<reference: string>"
#: ``Patient/<id>``, relative or at the end of an absolute URL: ``_record.patient_id_of``'s rule
_PATIENT_REF = r"(^|/)Patient/([^/]+)$"
#: the review's output: the row columns, and the file and line of an input line no patient could take
_OUT_SCHEMA = ROW_SCHEMA + ", file string, line long"
#: input bytes per shuffle partition: a partition's lines are sorted in the executor's memory
_PARTITION_BYTES = 48 * 1024 * 1024


def _fallback_keys(batches: Iterator[Any]) -> Iterator[Any]:
    """mapInArrow over the few lines the JVM could not key: ``_rows.key_line`` decides, as on the command line."""
    import pyarrow as pa

    for batch in batches:
        out: dict[str, list[Any]] = {k: [] for k in ("file", "line", "patient", "text", "problem")}
        cols = batch.to_pydict()
        for file, line, text in zip(cols["file"], cols["line"], cols["text"], strict=True):
            keyed = key_line(text)
            if keyed is None:
                continue
            out["file"].append(file)
            out["line"].append(line)
            out["patient"].append(keyed.patient)
            out["text"].append(text if keyed.problem is None else None)
            out["problem"].append(keyed.problem)
        yield pa.RecordBatch.from_pydict(out, schema=_arrow_schema(_KEYED_SCHEMA))


def _struct(ddl: str) -> Any:
    """A Spark StructType from ``name type, ...`` (the few types used here), parsed without a JVM.

    The Python workers build their Arrow output from it, and neither they nor a Spark
    Connect client have a JVM to parse a DDL string.
    """
    from pyspark.sql import types as T

    simple = {"string": T.StringType(), "boolean": T.BooleanType(), "long": T.LongType()}
    fields = []
    for part in ddl.split(","):
        name, kind = part.split()
        element = kind.removeprefix("array<").removesuffix(">")
        dtype = T.ArrayType(simple[element]) if kind.startswith("array<") else simple[kind]
        fields.append(T.StructField(name, dtype))
    return T.StructType(fields)


def _arrow_schema(ddl: str) -> Any:
    from pyspark.sql.pandas.types import to_arrow_schema

    return to_arrow_schema(_struct(ddl))


def _cores(spark: Any) -> int:
    try:
        return int(spark.sparkContext.defaultParallelism)
    except Exception:  # Spark Connect has no SparkContext: the cluster balances the partitions
        return 2


def _reviewer(profile_code: str, today: date, now: datetime, keep_drafts: bool, strict_r4: bool) -> Any:
    """applyInArrow: one patient's lines (sorted by file and line) to that patient's row.

    The lines no patient could take arrive as one group with a null patient: each
    becomes an output row naming its file, line and problem.
    """

    def review_group(table: Any) -> Any:
        import pyarrow as pa

        from .._profile import load_profile

        cols = table.to_pydict()
        patient = cols["patient"][0]
        if patient is None:
            rows = [
                dict(problem_row("", problem), patient=None, file=file, line=line)
                for file, line, problem in zip(cols["file"], cols["line"], cols["problem"], strict=True)
            ]
        else:
            lines = sorted(zip(cols["file"], cols["line"], cols["text"], strict=True))
            try:
                row = patient_row(
                    patient,
                    lines,
                    load_profile(profile_code),
                    today=today,
                    now=now,
                    keep_drafts=keep_drafts,
                    strict_r4=strict_r4,
                )
            except Exception as exc:  # one patient's failure must not stop the population
                row = problem_row(patient, f"the check failed ({type(exc).__name__})")
            rows = [dict(row, file=None, line=None)]
        return pa.Table.from_pylist(rows, schema=_arrow_schema(_OUT_SCHEMA))

    return review_group


def _partitions(paths: Sequence[str], cores: int) -> int:
    """Shuffle partitions: enough that each sorts in memory, at least two per core to balance the load."""
    size = sum(os.path.getsize(p) for p in paths)
    return max(2 * cores, -(-size // _PARTITION_BYTES))


def _replace_dir(tmp: Path, final: Path) -> None:
    if final.exists():
        old = final.with_name(final.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)


def run_population(
    spark: Any,
    files: Sequence[Path],
    out: Path,
    *,
    profile_code: str,
    today: date,
    now: datetime,
    keep_drafts: bool = False,
    strict_r4: bool = False,
) -> PopulationResult:
    """Check every patient in ``files``; write ``out/results.parquet`` and ``out/results.jsonl``.

    One pass over the input: the JVM reads each line's resource type and patient
    reference (``from_json`` with just those fields) and the few lines it cannot key
    go to ``_rows.key_line``; the lines are grouped by patient and each group is
    reviewed in Python (``applyInArrow``).  The rows are kept (small: no resource
    text) while the problems are collected and the rows are sorted and written.
    """
    from pyspark import StorageLevel
    from pyspark.sql import functions as F

    out.mkdir(parents=True, exist_ok=True)
    paths = [str(Path(p).resolve()) for p in files]
    raw = spark.read.text(paths, wholetext=True).select(
        F.regexp_extract(F.input_file_name(), r"([^/]+)$", 1).alias("file"), "value"
    )
    lines = (
        raw.select("file", F.posexplode(F.split("value", "\n")).alias("pos", "text"))
        .where(F.trim("text") != "")
        .select("file", (F.col("pos") + 1).alias("line"), "text")
    )
    fields = F.from_json("text", _KEY_FIELDS)
    rtype = fields["resourceType"]
    subject_ref = fields["subject"]["reference"]
    patient_ref = F.when(fields["subject"].isNull(), fields["patient"]["reference"])
    ref = F.coalesce(subject_ref, patient_ref)
    key = (
        F.when(rtype == "Patient", fields["id"])
        .when(rtype.isin(*READ_TYPES) & ref.rlike(_PATIENT_REF), F.regexp_extract(ref, _PATIENT_REF, 2))
        .when(rtype.isNotNull() & ~rtype.isin(*READ_TYPES), F.lit(""))  # a type the check does not read
    )
    with_key = lines.select("file", "line", key.alias("patient"), "text")
    keyed = with_key.where(F.col("patient") != "").select(
        "file", "line", "patient", "text", F.lit(None).cast("string").alias("problem")
    )
    # the lines the JVM could not key (not JSON, no patient reference, odd references): Python decides
    fallback = (
        with_key.where(F.col("patient").isNull())
        .select("file", "line", "text")
        .mapInArrow(_fallback_keys, _struct(_KEYED_SCHEMA))
    )
    cores = _cores(spark)
    reviewed = (
        keyed.unionByName(fallback.select("file", "line", "patient", "text", "problem"))
        .repartition(_partitions(paths, cores), "patient")
        .groupBy("patient")
        .applyInArrow(_reviewer(profile_code, today, now, keep_drafts, strict_r4), schema=_struct(_OUT_SCHEMA))
        .persist(StorageLevel.MEMORY_AND_DISK)
    )
    try:
        problems = [
            {"file": r["file"], "line": r["line"], "problem": r["problem"]}
            for r in reviewed.where(F.col("patient").isNull()).orderBy("file", "line").collect()
        ]
        tmp = out / ".results.parquet.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        rows = reviewed.where(F.col("patient").isNotNull()).select(*ROW_COLUMNS)
        rows.orderBy("patient").write.mode("overwrite").parquet(str(tmp))
    finally:
        reviewed.unpersist()
    parquet = out / "results.parquet"
    _replace_dir(tmp, parquet)
    jsonl = out / "results.jsonl"
    patients = write_jsonl(parquet, jsonl)
    return PopulationResult(parquet, jsonl, patients, problems)


def iter_rows(parquet: Path, columns: Sequence[str] | None = None) -> Iterator[dict[str, Any]]:
    """The rows of a results folder in patient order, a batch at a time (the driver never holds them all)."""
    import pyarrow.dataset as ds

    dataset = ds.dataset(str(parquet), format="parquet")
    for batch in dataset.to_batches(columns=list(columns) if columns else None, batch_size=4096):
        yield from batch.to_pylist()


def json_row(row: dict[str, Any]) -> dict[str, Any]:
    """A row as its JSON line: the status maps as objects, the drafts left to the Parquet file."""
    out = {k: v for k, v in row.items() if k != "drafts"}
    for key in ("statuses", "flag_statuses"):
        out[key] = json.loads(out[key]) if out.get(key) else None
    return out


def write_jsonl(parquet: Path, jsonl: Path) -> int:
    """``results.jsonl`` from the Parquet rows (written beside, renamed into place); the row count."""
    tmp = jsonl.with_name("." + jsonl.name + ".tmp")
    n = 0
    with open(tmp, "w", encoding="utf-8") as fh:
        for row in iter_rows(parquet):
            fh.write(json.dumps(json_row(row), sort_keys=False) + "\n")
            n += 1
    os.replace(tmp, jsonl)
    return n
