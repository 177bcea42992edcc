"""bAbI data, BABILong-style prompts, data specs and the word-level bAbI tokenizer.

The shipped bAbI files (CC BY 3.0, Weston et al. 2015) live in `DATA_DIR`; nothing outside the
package is read unless a path is passed (``data_dir=``, ``filler=``, ``jsonl:PATH``).
"""

from .babi import DATA_DIR, BabiSample, available_tasks, babi
from .babilong import TEMPLATE, Prompt, babilong, count_tokens, format_prompt, training_stream
from .spec import DataSpec, load_data, parse_data_spec
from .tokenizer import build_babi_tokenizer, pretokenize

__all__ = [
    "DATA_DIR", "BabiSample", "Prompt", "DataSpec", "TEMPLATE",
    "babi", "babilong", "available_tasks", "format_prompt", "count_tokens", "training_stream",
    "parse_data_spec", "load_data", "build_babi_tokenizer", "pretokenize",
]
