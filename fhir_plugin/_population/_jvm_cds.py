"""A class-data-sharing archive for the local Spark JVM, so a job does not spend its first seconds loading classes.

The driver JVM of a local job (which also runs the executor) loads thousands of classes
from Spark's jars before it does any work.  Java 13+ can write the classes a run
loaded to an archive as the JVM exits (``-XX:ArchiveClassesAtExit``) and map them at
the next start (``-XX:SharedArchiveFile``): measured on one CPU, the session starts in
2.4 s instead of 4.1 and its first Python task takes 1.4 s instead of 2.2
(docs/benchmarks-population.md).  The first job on a machine records the archive,
the later ones use it.

The archive belongs to one JVM build and one Spark class path, by path: the JVM refuses an
archive recorded with its jars anywhere else (another virtual environment, a CI clone),
and says so only in the messages turned off here.  Its name carries a key of both, so a
new Java, PySpark or install records its own; the cache keeps the few archives used
last (``_KEEP``) and deletes the rest, and settles every finished recording, whichever
install left it (``_settle_recordings``).  The JVM writes it as it exits,
after the Python driver that started it may have gone, so it is written under a
name of its own (the recording driver's process id) and put in place by a later
start, once that process has ended and the file has been still for ten seconds:
two jobs recording at once never share a file.  An archive the JVM
cannot use is ignored by the JVM itself (``-Xshare:auto``); its messages are off.
``FHIR_PLUGIN_SPARK_CDS=0`` turns all of this off.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import time
from pathlib import Path

from .._cache import cache_dir

__all__ = ["CDS_SWITCH", "cds_options"]

#: "0" turns the archive off (recording and using)
CDS_SWITCH = "FHIR_PLUGIN_SPARK_CDS"
_QUIET = "-Xlog:cds*=off"
#: a recording untouched this long, by a process that has ended, is complete (the JVM writes it in a second or two)
_SETTLE_SECONDS = 10
#: archives kept (the ones used last; each is 150–200 MB): this install's and a few others'
_KEEP = 3
#: a recording untouched this long is dropped, whatever its process id says (ids are reused)
_STALE_PART_SECONDS = 24 * 3600


def _java() -> Path | None:
    """The java PySpark will start: ``$JAVA_HOME/bin/java``, else the one on the PATH."""
    home = os.environ.get("JAVA_HOME")
    found = str(Path(home) / "bin" / "java") if home else shutil.which("java")
    return Path(found).resolve() if found and Path(found).exists() else None


def _key(java: Path, spark_home: Path, jvm_options: str) -> str:
    """What the archive is valid for: the JVM build (its binary and libjvm), Spark's jars and the options."""
    digest = hashlib.sha256()
    for part in (java, *sorted((java.parent.parent / "lib").glob("**/libjvm.so"))):
        stat = part.stat()
        digest.update(f"{part}:{stat.st_size}:{stat.st_mtime_ns}\n".encode())
    jars = spark_home / "jars"
    # by path and modification time, as the JVM checks the class path it was recorded with
    digest.update(f"{jars}\n".encode())
    for jar in sorted(jars.glob("*.jar")) if jars.is_dir() else ():
        stat = jar.stat()
        digest.update(f"{jar.name}:{stat.st_size}:{stat.st_mtime_ns}\n".encode())
    digest.update(jvm_options.encode())
    return digest.hexdigest()[:16]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _settle_recordings(folder: Path) -> None:
    """Each finished recording, whatever install left it, becomes its key's archive, or is dropped.

    Dropped when its key already has one: jobs started together each record, and one
    recording is enough.  Another install's finished recording is settled here too, not
    left for it to come back (a CI clone never does): every archive then counts against
    ``_KEEP``.  A recording older than a day is dropped even if its process id looks alive
    (a reused id).
    """
    for part in sorted(folder.glob("spark-jvm-*.*.part")):
        stem, _, rest = part.name.partition(".")
        try:
            pid = int(rest.removesuffix(".part"))
            stat = part.stat()
        except (ValueError, FileNotFoundError):
            continue
        age = time.time() - stat.st_mtime
        finished = not _alive(pid) and age >= _SETTLE_SECONDS
        if not finished and age <= _STALE_PART_SECONDS:
            continue  # still running, or its JVM still writing as it exits
        archive = folder / f"{stem}.jsa"
        if finished and not archive.exists() and stat.st_size > 0:
            os.replace(part, archive)
        else:
            part.unlink(missing_ok=True)


def _prune(folder: Path, archive: Path) -> None:
    """Keep ``archive`` and the archives used last: ``_KEEP`` in all."""
    others = sorted(
        (a for a in folder.glob("spark-jvm-*.jsa") if a != archive), key=lambda a: a.stat().st_mtime, reverse=True
    )
    for old in others[_KEEP - 1 :]:
        old.unlink(missing_ok=True)


def cds_options(spark_home: Path, jvm_options: str = "", *, pid: int | None = None) -> str:
    """The JVM options that use this machine's archive, or record it when there is none ("" when off).

    ``pid`` names the recording; the JVM is not started yet, so the caller's own
    process id stands for it, and a recording is only adopted once that process and
    the JVM (its child, which exits with it) are gone.
    """
    if os.environ.get(CDS_SWITCH, "1") == "0":
        return ""
    java = _java()
    if java is None:
        return ""
    folder = cache_dir()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        archive = folder / f"spark-jvm-{_key(java, spark_home, jvm_options)}.jsa"
        _settle_recordings(folder)
        if archive.exists():
            os.utime(archive)  # used now: the last to be pruned
        _prune(folder, archive)
    except OSError:
        return ""  # no writable cache: the job runs as it would without the archive
    if archive.exists():
        return f"-XX:SharedArchiveFile={archive} {_QUIET}"
    recording = folder / f"{archive.stem}.{pid or os.getpid()}.part"
    return f"-XX:ArchiveClassesAtExit={recording} {_QUIET}"
