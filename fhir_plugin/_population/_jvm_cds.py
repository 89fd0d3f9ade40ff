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
last (``_KEEP``) and deletes the rest.  The JVM writes it as it exits,
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
#: a recording for another key, untouched this long, was left by an install that never came back for it
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


def _adopt_recorded(folder: Path, archive: Path) -> None:
    """Put a finished recording in place (its JVM has exited); drop the others that have finished."""
    for part in sorted(folder.glob(f"{archive.stem}.*.part")):
        try:
            pid = int(part.name.rsplit(".", 2)[-2])
        except ValueError:
            continue
        stat = part.stat()
        if _alive(pid) or time.time() - stat.st_mtime < _SETTLE_SECONDS:
            continue  # still running, or its JVM still writing as it exits
        if not archive.exists() and stat.st_size > 0:
            os.replace(part, archive)
        else:
            part.unlink(missing_ok=True)


def _prune(folder: Path, archive: Path) -> None:
    """Keep ``archive`` and the archives used last (``_KEEP`` in all); drop stale recordings of other keys."""
    others = sorted(
        (a for a in folder.glob("spark-jvm-*.jsa") if a != archive), key=lambda a: a.stat().st_mtime, reverse=True
    )
    for old in others[_KEEP - 1 :]:
        old.unlink(missing_ok=True)
    for part in folder.glob("spark-jvm-*.part"):
        if not part.name.startswith(archive.stem + ".") and time.time() - part.stat().st_mtime > _STALE_PART_SECONDS:
            part.unlink(missing_ok=True)


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
        _adopt_recorded(folder, archive)
        if archive.exists():
            os.utime(archive)  # used now: the last to be pruned
        _prune(folder, archive)
    except OSError:
        return ""  # no writable cache: the job runs as it would without the archive
    if archive.exists():
        return f"-XX:SharedArchiveFile={archive} {_QUIET}"
    recording = folder / f"{archive.stem}.{pid or os.getpid()}.part"
    return f"-XX:ArchiveClassesAtExit={recording} {_QUIET}"
