"""bAbI data, BABILong prompts, the paper's evaluation set, filler books, data specs and the
word-level bAbI tokenizer.

The shipped bAbI files (CC BY 3.0, Weston et al. 2015) live in `DATA_DIR`, the filler books
(public domain, Project Gutenberg) in `FILLER_DIR`; nothing outside the package is read unless a
path is passed (``data_dir=``, ``filler=``, ``jsonl:PATH``).
"""

from .babi import DATA_DIR, BabiSample, available_tasks, babi
from .babilong import (
    MAX_LENGTH, RESERVED_TOKENS, TEMPLATE, Prompt, babilong, count_tokens, filler_sentences, format_prompt, parse_length,
    parse_lengths, training_stream,
)
from .books import FILLER_DIR, split_sentences
from .paper import PAPER_TASKS, paper_prompts
from .spec import DataSpec, load_data, parse_data_spec
from .tokenizer import build_babi_tokenizer, pretokenize

__all__ = [
    "DATA_DIR", "FILLER_DIR", "BabiSample", "Prompt", "DataSpec", "TEMPLATE", "MAX_LENGTH", "RESERVED_TOKENS",
    "PAPER_TASKS", "babi", "babilong", "available_tasks", "format_prompt", "count_tokens", "training_stream",
    "parse_length", "parse_lengths", "filler_sentences", "split_sentences", "paper_prompts",
    "parse_data_spec", "load_data", "build_babi_tokenizer", "pretokenize",
]
