"""The built-in audit detectors; importing this package registers them (registry kind ``detector``)."""

from tunesec.audit.detectors import duplicates, encodings, harmful, persona, pii, templates, triggers

__all__ = ["duplicates", "encodings", "harmful", "persona", "pii", "templates", "triggers"]
