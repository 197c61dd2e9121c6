"""`velocitune demo`: the whole method on an embedded corpus, offline, on a CPU, in minutes.

`pipeline` runs the stages (and gives the CLI its `add_arguments` and `main`); `corpus`,
`math_problems` and `tokenizer` build the demo's data and tokenizer from what the setup installs.
"""

from velocitune.demo.corpus import CPT_DOMAINS, PRETRAIN_DOMAIN, build_corpus
from velocitune.demo.pipeline import add_arguments, main, run_demo
from velocitune.demo.tokenizer import train_tokenizer

__all__ = ["CPT_DOMAINS", "PRETRAIN_DOMAIN", "add_arguments", "build_corpus", "main", "run_demo", "train_tokenizer"]
