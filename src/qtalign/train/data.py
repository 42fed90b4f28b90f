"""Training rows: question-translation records -> token ids and labels (loss on the response only), raw or with the
tokenizer's chat template; the collator; the seeded validation split.

Raw rule: ``ids = tokenizer(prompt + response)`` with the tokenizer's default special tokens (BOS for Llama/Gemma
tokenizers, none for Qwen), then EOS appended (unless already last). Chat rule: the conversation [user: prompt,
assistant: response] rendered by the tokenizer's chat template with its defaults and tokenized without adding special
tokens again. Either way the labels are -100 over the longest common token prefix of the prompt's ids (for chat: the
user turn with the assistant's generation prompt) and ``ids``, and equal ``ids`` after it, so a token that merges the
end of the prompt with the start of the response is trained on. Sequences are truncated to ``cutoff_len`` from the
end; a row left without response tokens is skipped (and counted).
"""

from __future__ import annotations

import random
from pathlib import Path

import torch
from torch.nn.utils.rnn import pad_sequence

from qtalign.tokenids import lcp
from qtalign.errors import QtalignError, data_error


def load_pairs(paths: list[str | Path], rows_per_file: int | None = None) -> list[dict]:
    """Question-translation records (read by :func:`qtdata.load_question_records`: our JSONL with input/output,
    the official *_question.json files with input/answer, alpaca JSON) -> [{'id', 'prompt', 'response'}]."""
    from qtalign.qtdata.files import load_question_records

    out = []
    for p in paths:
        p = Path(p)
        recs = load_question_records(p)
        if rows_per_file:
            recs = recs[:rows_per_file]
        for r in recs:
            if not r["input"] or not r["output"]:
                raise data_error(p, "empty prompt or response", record=r["row"], field="input" if not r["input"] else "output")
            out.append({"id": str(r["id"]), "prompt": r["input"], "response": r["output"]})
    if not out:
        raise QtalignError("train: no training records (pass at least one data file)")
    return out



def encode_example(tokenizer, prompt: str, response: str, cutoff_len: int = 2048, template: str = "raw") -> dict | None:
    """{'input_ids', 'labels'} for one pair (see the module docstring for the rule); None when truncation leaves
    no response token. ``template='chat'`` renders the pair as a user and an assistant turn with the tokenizer's chat
    template (the text is tokenized without adding special tokens again: the template writes them)."""
    if template == "chat":
        p_text, full_text = chat_texts(tokenizer, prompt, response)
        p_ids = tokenizer(p_text, add_special_tokens=False)["input_ids"]
        ids = list(tokenizer(full_text, add_special_tokens=False)["input_ids"])  # the template ends the assistant turn
    else:
        eos = tokenizer.eos_token_id
        if eos is None:
            raise QtalignError("train: the tokenizer has no EOS token")
        p_ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
        ids = list(tokenizer(prompt + response, add_special_tokens=True)["input_ids"])
        if not ids or ids[-1] != eos:
            ids.append(eos)
    n_prompt = max(lcp(p_ids, ids), 1)  # position 0 has no previous token: never a target
    ids = ids[:cutoff_len]
    labels = [-100] * min(n_prompt, len(ids)) + ids[n_prompt:]
    if all(x == -100 for x in labels):
        return None
    return {"input_ids": ids, "labels": labels}


def chat_texts(tokenizer, prompt: str, response: str) -> tuple[str, str]:
    """(the user turn with the assistant's generation prompt, the whole conversation) as the tokenizer's chat template
    writes them, with its defaults (e.g. Qwen2.5's default system line)."""
    user = [{"role": "user", "content": prompt}]
    p_text = tokenizer.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template(user + [{"role": "assistant", "content": response}], tokenize=False)
    if not full.startswith(p_text):  # templates that rewrite earlier turns would break the prompt mask
        raise QtalignError("train: the tokenizer's chat template does not write the user turn as a prefix of the "
                           "conversation; use template: raw")
    return p_text, full


def check_template(tokenizer, template: str, model_name: str) -> None:
    """template 'chat' needs a tokenizer with a chat template (one clear error naming the model otherwise)."""
    if template != "chat":
        return
    if not getattr(tokenizer, "chat_template", None):
        raise QtalignError(f"train: template 'chat': the tokenizer of model '{model_name}' has no chat template "
                           "(GGUF files without tokenizer.chat_template, base models); use template: raw")
    from jinja2.exceptions import TemplateError

    try:
        chat_texts(tokenizer, "question", "answer")
    except TemplateError as e:  # a syntax error, or the template's own raise_exception
        raise QtalignError(f"train: template 'chat': the chat template of model '{model_name}' does not render "
                           f"({type(e).__name__}: {str(e).splitlines()[0][:160]}); fix it or use template: raw") from None


class Collator:
    """Right-pads input_ids (pad id), labels (-100) and builds the attention mask."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, feats: list[dict]) -> dict:
        def pad(rows: list[list[int]], value: int) -> torch.Tensor:
            return pad_sequence([torch.tensor(r, dtype=torch.long) for r in rows], batch_first=True, padding_value=value)

        ids = [f["input_ids"] for f in feats]
        return {"input_ids": pad(ids, self.pad_id), "attention_mask": pad([[1] * len(i) for i in ids], 0),
                "labels": pad([f["labels"] for f in feats], -100)}


def split_rows(n: int, val_size: float, seed: int, max_rows: int | None = None) -> tuple[list[int], list[int]]:
    """(train indices, val indices): a seeded shuffle, the first `val` rows held out (a fraction: at most
    ``max_rows``)."""
    idx = list(range(n))
    random.Random(seed).shuffle(idx)
    n_val = int(val_size) if val_size >= 1 else (max(1, round(n * val_size)) if val_size > 0 else 0)
    if 0 < val_size < 1 and max_rows is not None:
        n_val = min(n_val, max_rows)
    if n_val >= n:
        raise QtalignError(f"train: val_size {val_size} leaves no training rows (of {n})")
    return sorted(idx[n_val:]), sorted(idx[:n_val])


