"""Data: files -> records -> conversations or documents -> token ids + labels (-100 = not trained).

    from lmdistill.data import load_examples, pad_batch
    examples = load_examples("train.jsonl", tokenizer, max_seq_len=512)   # list of {"input_ids", "labels"}
    print(examples.stats.summary())
    batch = pad_batch(examples[:8], tokenizer.pad_token_id)                # (B, T) LongTensors

Modules: `readers` (files -> records), `formats` (record shapes), `render` (chat template -> ids + labels),
`loader` (the whole path, with counts), `store` (the tokenized, memory-mapped store `load_examples` reads through),
`stats` (the counts), `collate` (padding), `cli` (`lmdistill data`).
"""

from lmdistill.data.collate import pad_batch, shift_labels
from lmdistill.data.prompts import load_prompts, prompt_examples
from lmdistill.data.formats import ACCEPTED_SHAPES, FORMATS, detect_format, parse_record, record_texts
from lmdistill.data.loader import iter_texts, load_examples, tokenize_examples
from lmdistill.data.stats import DataStats, Examples
from lmdistill.data.readers import check_data_path, read_records
from lmdistill.data.render import (
    CHATML_TEMPLATE,
    IGNORE_INDEX,
    render_conversation,
    render_conversation_examples,
    render_prompt,
)

__all__ = [
    "ACCEPTED_SHAPES", "CHATML_TEMPLATE", "DataStats", "Examples", "FORMATS", "IGNORE_INDEX", "check_data_path",
    "detect_format", "iter_texts", "load_examples", "load_prompts", "pad_batch", "parse_record", "prompt_examples",
    "read_records", "record_texts", "render_conversation", "render_conversation_examples", "render_prompt", "shift_labels",
    "tokenize_examples",
]
