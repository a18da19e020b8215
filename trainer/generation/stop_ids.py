"""Which token ids end an answer, and which id pads a generation batch: one rule for every decoder
(PPO's rollouts, SFT's eval samples, demo.py's HF and pipelined paths).

Stop ids: the tokenizer's EOS, every eos_token_id of the model's config.json, and every eos_token_id
of its generation_config.json. Chat models list their end-of-turn token there (Llama 3's <|eot_id|>
beside <|end_of_text|>; Qwen's <|im_end|>), so reading only one of the three stops some answers late.
"""
import json
from pathlib import Path
from typing import Optional, Union


def eos_ids(value) -> list[int]:
    """An eos_token_id value as written in a config (an id, a list of ids, or null) -> its ids."""
    return [i for i in (value if isinstance(value, (list, tuple)) else [value]) if i is not None]


def answer_stop_ids(tokenizer, model_config, model_dir: Union[str, Path, None] = None) -> list[int]:
    """Sorted token ids that end an answer. tokenizer may be None (the model's own ids only);
    model_dir: the folder holding generation_config.json, when there is one."""
    ids = set(eos_ids(model_config.eos_token_id))
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    gen_file = Path(model_dir) / "generation_config.json" if model_dir else None
    if gen_file is not None and gen_file.is_file():
        ids.update(eos_ids(json.loads(gen_file.read_text()).get("eos_token_id")))
    return sorted(ids)


def generation_pad_id(tokenizer=None, model_config=None) -> int:
    """The id that fills a generation batch's left padding (masked out, never attended or trained):
    the tokenizer's pad, else its EOS; without a tokenizer the config's pad, else 0."""
    for value in ((tokenizer.pad_token_id, tokenizer.eos_token_id) if tokenizer is not None else ()):
        if value is not None:
            return value
    pad: Optional[int] = getattr(model_config, "pad_token_id", None) if model_config is not None else None
    return pad if pad is not None else 0
