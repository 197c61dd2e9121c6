"""`velocitune prepare`: tokenize per-domain corpora into token shards with a fixed held-out val split.

Each domain's input files (text, JSON Lines, Parquet) or local datasets (`hf:PATH`) are read as
documents, tokenized with a local Hugging Face tokenizer (EOS after every document) and written as
headered token shards: the documents with the lowest text hashes are the domain's validation split, the
others its train split; a manifest.json describes the result. Output layout and manifest:
docs/contracts.md. It can run sharded over N machines, whose parts `merge_prepared` combines into what
one machine writes.

Modules, one job each: `sources` (input files and their documents), `hf` (local datasets through the
`datasets` library), `encode` (the tokenizer and its worker processes), `settings` (the settings that
shape the streams, their defaults, the val-size floor), `split` (the val split and the token shards), `pipeline`
(`prepare_corpus`: inputs hash, reruns), `merge` (`merge_prepared`), `command` (the command line).
manifest.json and the done markers are read and written by `velocitune.manifest`, beside
`velocitune.shards` (its docstring says why it is not in this package).
"""

from velocitune.prepare.command import add_arguments, load_config, main
from velocitune.prepare.encode import TokenizerInfo, load_tokenizer
from velocitune.prepare.merge import merge_prepared
from velocitune.prepare.pipeline import PREPARE_VERSION, inputs_hash, prepare_corpus
from velocitune.prepare.settings import (
    DEFAULT_SHARD_TOKENS,
    DEFAULT_VAL_FRACTION,
    DEFAULT_VAL_TOKENS,
    MIN_VAL_WINDOWS,
    USEFUL_VAL_WINDOWS,
    Settings,
    make_settings,
)
from velocitune.prepare.sources import (
    JSONL_EXTENSIONS,
    PARQUET_EXTENSIONS,
    TEXT_EXTENSIONS,
    SourceFile,
    file_kind,
    is_utf8,
    iter_documents,
    list_domain_files,
    normalize_domains,
)
from velocitune.prepare.split import doc_hash

__all__ = [
    "DEFAULT_SHARD_TOKENS",
    "DEFAULT_VAL_FRACTION",
    "DEFAULT_VAL_TOKENS",
    "JSONL_EXTENSIONS",
    "MIN_VAL_WINDOWS",
    "PARQUET_EXTENSIONS",
    "PREPARE_VERSION",
    "TEXT_EXTENSIONS",
    "USEFUL_VAL_WINDOWS",
    "Settings",
    "SourceFile",
    "TokenizerInfo",
    "add_arguments",
    "doc_hash",
    "file_kind",
    "inputs_hash",
    "is_utf8",
    "iter_documents",
    "list_domain_files",
    "load_config",
    "load_tokenizer",
    "main",
    "make_settings",
    "merge_prepared",
    "normalize_domains",
    "prepare_corpus",
]
