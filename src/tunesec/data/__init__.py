"""tunesec.data: the example schema, loaders, named datasets, tunesec's own offline sets and poison mixing.

Importing this package registers the named datasets and never imports torch.
"""

from tunesec.data.loaders import load_examples, strip_alpaca_template
from tunesec.data.mixing import dataset_sha256, mix_poison, train_test_split
from tunesec.data.named import dataset_names, load_dataset_by_name, resolve_dataset
from tunesec.data.schema import Example, Message
from tunesec.data.sources import data_root, sample_examples

__all__ = [
    "Example",
    "Message",
    "data_root",
    "dataset_names",
    "dataset_sha256",
    "load_dataset_by_name",
    "load_examples",
    "mix_poison",
    "resolve_dataset",
    "sample_examples",
    "strip_alpaca_template",
    "train_test_split",
]
