"""tunesec: a security lab for the fine-tuning lifecycle of large language models."""

__version__ = "0.1.0"
