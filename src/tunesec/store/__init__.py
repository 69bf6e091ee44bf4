"""Run directories, atomic writes and provenance."""

from tunesec.store.atomic import atomic_write_bytes, atomic_write_json, atomic_write_text
from tunesec.store.provenance import git_revision, package_versions, sha256_file, sha256_tree
from tunesec.store.run import RunDir, utc_stamp

__all__ = [
    "RunDir",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_text",
    "git_revision",
    "package_versions",
    "sha256_file",
    "sha256_tree",
    "utc_stamp",
]
