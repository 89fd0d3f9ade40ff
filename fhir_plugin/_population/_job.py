"""The population job on Apache Spark: NDJSON in, one worklist row per patient out (Parquet + JSON lines).

Spark carries the check, it does not reimplement it: the JVM finds each line's
patient (its resource type and ``subject`` reference; ``_rows.key_line`` decides the
lines it cannot), the lines are grouped by patient, and each group goes through
``_rows.patient_row`` (the one review pipeline) in an Arrow-based grouped map: the
lines are partitioned by patient and sorted, and ``mapInArrow`` reviews each
patient's run of lines.  Only the DataFrame API is used, so the same job runs in
local mode (the default), on a standalone or YARN/Kubernetes master, and through
Spark Connect.

Line numbers: each file is read whole (``wholetext``) and split with its positions,
so a problem names its file and line; a file larger than ``_pieces.PIECE_BYTES`` is
first cut at line ends into pieces (in ``OUT/.pieces``, removed after), read under
their source's name and numbered from their first line.

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
from .._vocab import DRAFT_TAG
from ._daemon import WARM_R4
from ._jvm_cds import cds_options
from ._pieces import PIECE_BYTES, Oversized, Piece, cut_large_files
from ._rows import READ_TYPES, ROW_COLUMNS, key_line, patient_row, problem_row

__all__ = [
    "SparkSettings",
    "spark_session",
    "warm_workers",
    "run_population",
    "PopulationResult",
    "ROW_SCHEMA",
    "ndjson_files",
]

#: the Spark schema of a worklist row (``_rows.ROW_COLUMNS`` in order)
ROW_SCHEMA = (
    "patient string, encounter string, complete boolean, code_fit string, suggested array<string>, "
    "gaps array<string>, red_flags array<string>, referral boolean, drafts_allowed boolean, "
    "refused string, statuses string, flag_statuses string, problem string, drafts string"
)


@dataclass(frozen=True)
class SparkSettings:
    """Where the job runs: ``master`` (default ``local[*]``), or a Spark Connect ``remote`` URL."""

    master: str | None = None
    remote: str | None = None
    shuffle_partitions: int | None = None
    driver_memory: str | None = None
    #: the workers will validate whole resources or build drafts: their daemon builds the R4 validators first
    warm_r4: bool = False


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
    if settings.warm_r4:
        os.environ[WARM_R4] = "1"  # local mode: the workers' daemon inherits the driver's environment
        builder = builder.config(f"spark.executorEnv.{WARM_R4}", "1")
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
    if master.startswith("local"):
        # a job of minutes in one JVM: the quick JIT tier costs the least CPU in all, and the serial
        # collector keeps the heap near what is live (the parallel one grew it with the population: +27%
        # from 10k to 100k patients against +9%; docs/benchmarks-population.md); a cluster keeps its own
        # and its classes come from a class-data-sharing archive once one is recorded (_jvm_cds)
        jvm_options = f"{_LOCAL_JVM_OPTIONS} {cds_options(_spark_home(), _LOCAL_JVM_OPTIONS)}".strip()
        builder = builder.config("spark.driver.extraJavaOptions", jvm_options)
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


def _spark_home() -> Path:
    """Where PySpark's jars are: ``$SPARK_HOME``, else the pip-installed distribution."""
    import pyspark

    home = os.environ.get("SPARK_HOME")
    return Path(home) if home else Path(pyspark.__file__).parent


def _warmer(profile_code: str) -> Any:
    """mapInArrow: load the job's profile in this worker (its daemon has loaded the rest), pass nothing on."""

    def warm(batches: Iterator[Any]) -> Iterator[Any]:
        from .._profile import load_profile

        load_profile(profile_code)
        for _ in batches:
            pass
        return iter(())

    return warm


def warm_workers(spark: Any, profile_code: str) -> None:
    """Start the Python workers (one per core) before the job, e.g. while an export runs on the server."""
    cores = _cores(spark)
    spark.range(0, cores, 1, cores).mapInArrow(_warmer(profile_code), "id long").collect()


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
#: the review's output: the row columns, and the file and line of an input line no patient could take
_OUT_SCHEMA = ROW_SCHEMA + ", file string, line long"
#: the driver JVM's options in local mode (it also runs the executor)
_LOCAL_JVM_OPTIONS = "-XX:TieredStopAtLevel=1 -XX:+UseSerialGC"
#: rows per results file and bytes per Parquet row group (see ``run_population``)
_FILE_ROWS = 20_000
_ROW_GROUP_BYTES = 4 * 1024 * 1024
#: input bytes per shuffle partition: a partition's lines are sorted in the executor's memory
_PARTITION_BYTES = 48 * 1024 * 1024


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


def _unkeyed_problems(files: list[str], lines: list[int], texts: list[str]) -> Iterator[tuple[str, int, str]]:
    """The problem of each line the JVM could not key, as ``_rows.key_line`` (the command line's rule) says it.

    A line ``key_line`` does key (the JVM's JSON reader refused what Python's reads) is
    reported too: it reached no patient's group, and it must not vanish silently.
    """
    for file, line, text in sorted(zip(files, lines, texts, strict=True)):
        keyed = key_line(text)
        if keyed is None:
            continue
        if keyed.problem is not None:
            yield file, line, keyed.problem
        else:
            yield file, line, f"Patient/{keyed.patient}'s {keyed.type} could not be grouped with the record; not read"


def _reviewer(profile_code: str, today: date, now: datetime, keep_drafts: bool, strict_r4: bool) -> Any:
    """mapInArrow over a partition sorted by patient, file and line: each patient's run of lines to one row.

    This is the grouped map by hand: Spark has put each patient's lines in one
    partition, together and in order, and each Arrow batch is converted once —
    rather than one Arrow stream per patient (``applyInArrow``), whose cost per
    group was most of the job's (docs/benchmarks-population.md).  The lines no
    patient could take (a null patient, sorted first) become problem rows naming
    their file and line.
    """

    def review_partition(batches: Iterator[Any]) -> Iterator[Any]:
        import pyarrow as pa

        from .._profile import load_profile

        profile = load_profile(profile_code)
        schema = _arrow_schema(_OUT_SCHEMA)
        out: list[dict[str, Any]] = []
        unkeyed: list[tuple[str, int, str]] = []
        current: str | None = None
        lines: list[tuple[str, int, str]] = []

        def finish() -> None:
            if current is None:
                return
            try:
                row = patient_row(
                    current, lines, profile, today=today, now=now, keep_drafts=keep_drafts, strict_r4=strict_r4
                )
            except Exception as exc:  # one patient's failure must not stop the population
                row = problem_row(current, f"the check failed ({type(exc).__name__})")
            out.append(dict(row, file=None, line=None))

        for batch in batches:
            cols = batch.to_pydict()
            for patient, file, line, text in zip(
                cols["patient"], cols["file"], cols["line"], cols["text"], strict=True
            ):
                if patient is None:
                    unkeyed.append((file, line, text))
                    continue
                if patient != current:
                    finish()
                    current, lines = patient, []
                lines.append((file, line, text))
            if len(out) >= 1024:
                yield pa.RecordBatch.from_pylist(out, schema=schema)
                out = []
        finish()
        if unkeyed:
            files, numbers, texts = zip(*unkeyed, strict=True)
            out.extend(
                dict(problem_row("", problem), patient=None, file=file, line=line)
                for file, line, problem in _unkeyed_problems(list(files), list(numbers), list(texts))
            )
        if out:
            yield pa.RecordBatch.from_pylist(out, schema=schema)

    return review_partition


def _partitions(paths: Sequence[str], cores: int) -> int:
    """Shuffle partitions: enough that each sorts in memory, at least two per core to balance the load."""
    size = sum(os.path.getsize(p) for p in paths)
    return max(2 * cores, -(-size // _PARTITION_BYTES))


def _oversized_problems(lines: Sequence[Oversized], limit: int) -> list[dict[str, Any]]:
    """The lines too long to read (``_pieces``), as problems naming their file and line."""
    return [
        {
            "file": o.source_name,
            "line": o.line,
            "problem": f"a line of {_size(o.size)}, longer than the {_size(limit)} one resource may be; not read",
        }
        for o in lines
    ]


def _size(n: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} bytes"


def _file_line(problem: dict[str, Any]) -> tuple[str, int]:
    return str(problem["file"]), int(problem["line"] or 0)


def _source_columns(pieces: Sequence[Piece]) -> tuple[Any, Any]:
    """The ``file`` and first-line columns of a read file: a piece's are its source's (``_pieces``)."""
    from pyspark.sql import functions as F

    name = F.col("name")
    if not pieces:
        return name, F.lit(1)
    sources = F.create_map(*[F.lit(v) for p in pieces for v in (p.path.name, p.source_name)])
    firsts = F.create_map(*[F.lit(v) for p in pieces for v in (p.path.name, p.first_line)])
    return F.coalesce(sources[name], name), F.coalesce(firsts[name], F.lit(1))


def _recover_dir(final: Path) -> None:
    """Put back the previous results if a run was killed between ``_replace_dir``'s two renames."""
    old = final.with_name(final.name + ".old")
    if not final.exists() and old.exists():
        os.replace(old, final)


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
    piece_bytes: int = PIECE_BYTES,
) -> PopulationResult:
    """Check every patient in ``files``; write ``out/results.parquet`` and ``out/results.jsonl``.

    One pass over the input: the JVM reads each line's resource type and patient
    reference (``from_json`` with just those fields); the few lines it cannot key
    form one group that ``_rows.key_line`` reports on; each patient's lines are
    reviewed in Python (``_reviewer``).  The rows are kept (small: no resource
    text) while the problems are collected and the rows are sorted and written.
    """
    from pyspark.sql import functions as F

    out.mkdir(parents=True, exist_ok=True)
    _recover_dir(out / "results.parquet")
    # beside the results, so executors that write them read the pieces too (a cluster's shared folder)
    staging = out / ".pieces"
    try:
        read, pieces, oversized = cut_large_files([Path(p) for p in files], staging, piece_bytes)
        reviewed = _reviewed(spark, read, pieces, profile_code, today, now, keep_drafts, strict_r4)
        try:
            problems = [
                {"file": r["file"], "line": r["line"], "problem": r["problem"]}
                for r in reviewed.where(F.col("patient").isNull()).orderBy("file", "line").collect()
            ]
            if oversized:
                problems = sorted(problems + _oversized_problems(oversized, piece_bytes), key=_file_line)
            tmp = out / ".results.parquet.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            rows = reviewed.where(F.col("patient").isNotNull()).select(*ROW_COLUMNS)
            # files and row groups of bounded size, so whoever reads the results back a batch at a time
            # (the report, the JSON lines, write-back) holds a bounded part of them, however many patients
            (
                rows.orderBy("patient")
                .write.mode("overwrite")
                .option("maxRecordsPerFile", _FILE_ROWS)
                .option("parquet.block.size", _ROW_GROUP_BYTES)
                .parquet(str(tmp))
            )
        finally:
            reviewed.unpersist()
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    parquet = out / "results.parquet"
    _replace_dir(tmp, parquet)
    jsonl = out / "results.jsonl"
    patients = write_jsonl(parquet, jsonl)
    return PopulationResult(parquet, jsonl, patients, problems)


def _reviewed(
    spark: Any,
    read: Sequence[Path],
    pieces: Sequence[Piece],
    profile_code: str,
    today: date,
    now: datetime,
    keep_drafts: bool,
    strict_r4: bool,
) -> Any:
    """The reviewed rows and problem rows as a DataFrame kept on disk: ``run_population``'s one pass."""
    from pyspark import StorageLevel
    from pyspark.sql import functions as F

    paths = [str(p.resolve()) for p in read]
    raw = spark.read.text(paths, wholetext=True).select(
        F.regexp_extract(F.input_file_name(), r"([^/]+)$", 1).alias("name"), "value"
    )
    source, first_line = _source_columns(pieces)
    lines = (
        raw.select("name", F.posexplode(F.split("value", "\n")).alias("pos", "text"))
        .where(F.length("text") > 0)  # a line of spaces is left to key_line, which skips it
        .select(source.alias("file"), (F.col("pos") + first_line).alias("line"), "text")
    )
    # the parsed fields as a column: used inline in several branches, the line was parsed once per use
    parsed = lines.select("file", "line", "text", F.from_json("text", _KEY_FIELDS).alias("k"))
    fields = F.col("k")
    rtype = fields["resourceType"]
    ref = F.coalesce(fields["subject"]["reference"], F.when(fields["subject"].isNull(), fields["patient"]["reference"]))
    # ``…Patient/<id>``, relative or at the end of an absolute URL: ``_record.patient_id_of``'s rule
    # (measured: string functions here made Spark parse the line once per use, the regex did not)
    patient_ref = r"(^|/)Patient/([^/]+)$"
    key = (
        F.when(rtype == "Patient", fields["id"])
        # a note is read only when it is the plugin's own (``_drafts.is_plan_note``): the others, often most of
        # an export's bytes, stay in the JVM instead of crossing the shuffle to be dropped in Python
        .when((rtype == "DocumentReference") & ~F.col("text").contains(DRAFT_TAG["system"]), F.lit(""))
        .when(rtype.isin(*READ_TYPES) & ref.rlike(patient_ref), F.regexp_extract(ref, patient_ref, 2))
        .when(rtype.isNotNull() & ~rtype.isin(*READ_TYPES), F.lit(""))  # a type the check does not read
    )
    # a null patient: the JVM could not key the line (not JSON, no patient reference): one group, for key_line
    keyed = parsed.select("file", "line", key.alias("patient"), "text").where(
        F.col("patient").isNull() | (F.col("patient") != "")
    )
    return (
        keyed.repartition(_partitions(paths, _cores(spark)), "patient")
        .sortWithinPartitions("patient", "file", "line")
        .mapInArrow(_reviewer(profile_code, today, now, keep_drafts, strict_r4), _struct(_OUT_SCHEMA))
        # on disk only: kept in memory, the rows made the driver's JVM grow with the population
        .persist(StorageLevel.DISK_ONLY)
    )


def iter_rows(parquet: Path, columns: Sequence[str] | None = None) -> Iterator[dict[str, Any]]:
    """The rows of a results folder in patient order, a batch at a time (the driver never holds them all).

    File by file: Spark wrote them in patient order.
    """
    import pyarrow.parquet as pq

    for path in sorted(Path(parquet).glob("*.parquet")):
        source = pq.ParquetFile(path)
        for batch in source.iter_batches(batch_size=4096, columns=list(columns) if columns else None):
            yield from batch.to_pylist()
        source.close()


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
