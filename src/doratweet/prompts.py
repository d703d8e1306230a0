"""Chat-template prompts, answer tokens and loss masks.

A tweet becomes: [system prompt] + [tweet as the user message] + [generation prompt], rendered by the
model's own chat template. The answer is the label word followed by the template's end-of-turn token
(`<|im_end|>` for ChatML), so a fine-tuned model learns to answer with one word and stop.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from . import LABELS
from .errors import UserError

log = logging.getLogger("doratweet")

DEFAULT_SYSTEM_PROMPT = (
    "You classify the sentiment of tweets. Answer with exactly one word: negative, neutral or positive."
)
IGNORE_INDEX = -100  # positions the loss skips (the prompt and padding)
# For base models without a chat template (plain pretrained LMs): a plain-text layout whose answer ends with the
# tokenizer's EOS token, so the fine-tuned model still learns to answer with one word and stop.
FALLBACK_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] + '\n\n' }}"
    "{% elif message['role'] == 'user' %}{{ 'Tweet: ' + message['content'] + '\n' }}"
    "{% else %}{{ 'Sentiment: ' + message['content'] + eos_token }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ 'Sentiment:' }}{% endif %}"
)
_SENTINEL = "\u2063TWEET\u2063"  # invisible separators: cannot collide with a real template's text


@dataclass
class PromptFormat:
    """How one model turns tweets into token ids; built once per model by `make_prompt_format`."""

    tokenizer: object
    system_prompt: str
    prefix: str  # rendered template text before the tweet
    suffix: str  # rendered template text after the tweet, ending with the generation prompt
    answer_ids: list[list[int]]  # per label id: the label word's tokens + the end-of-turn token
    end_of_turn_id: int

    def prompt_text(self, text: str) -> str:
        return self.prefix + text + self.suffix

    def prompt_ids(self, texts: list[str]) -> list[list[int]]:
        """Template tokens around each tweet's tokens. The tweet is tokenised on its own with special tokens
        split into plain text, so a tweet containing `<|im_end|>` cannot end its turn early or forge an answer
        (for ordinary tweets the ids equal those of the whole rendered prompt: checked on TweetEval's 2,000
        validation tweets)."""
        prefix, suffix = self.shared_prefix_ids(), self._suffix_ids()
        tweets = self.tokenizer(list(texts), add_special_tokens=False, split_special_tokens=True)["input_ids"]
        return [prefix + ids + suffix for ids in tweets]

    def shared_prefix_ids(self) -> list[int]:
        """Tokens every prompt starts with (the system prompt and the user header).

        Its keys/values are the same for every tweet, so training and scoring compute them once per batch
        instead of once per tweet; they are about 40% of a SmolLM2 prompt.
        """
        return self.tokenizer(self.prefix, add_special_tokens=False)["input_ids"]

    def _suffix_ids(self) -> list[int]:
        return self.tokenizer(self.suffix, add_special_tokens=False)["input_ids"]

    def stop_ids(self) -> list[int]:
        """Token ids that end an answer: the template's end-of-turn token and the model's EOS."""
        ids = {self.end_of_turn_id}
        if self.tokenizer.eos_token_id is not None:
            ids.add(self.tokenizer.eos_token_id)
        return sorted(ids)


def make_prompt_format(tokenizer, system_prompt: str = DEFAULT_SYSTEM_PROMPT) -> PromptFormat:
    if not has_chat_template(tokenizer):
        if tokenizer.eos_token is None:
            raise UserError("--model: the tokenizer has no chat template and no EOS token, so answers cannot end; "
                            "use an instruction-tuned model or add a chat template to its tokenizer_config.json")
        log.warning("the model has no chat template; using doratweet's plain fallback (system prompt, "
                    "'Tweet: ...', 'Sentiment: <label><eos>'); prediction with this base model uses it too")
    prompt = _render(tokenizer, system_prompt, _SENTINEL, answer=None)
    if prompt.count(_SENTINEL) != 1:
        raise ValueError("the chat template does not insert the user message verbatim")
    prefix, suffix = prompt.split(_SENTINEL)
    end_of_turn_id, answer_ids = _answer_tokens(tokenizer, system_prompt, prompt)
    return PromptFormat(tokenizer, system_prompt, prefix, suffix, answer_ids, end_of_turn_id)


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def _render(tokenizer, system_prompt: str, user: str, answer: str | None) -> str:
    messages = [{"role": "system", "content": system_prompt}, {"role": "user", "content": user}]
    if answer is not None:
        messages.append({"role": "assistant", "content": answer})
    template = None if has_chat_template(tokenizer) else FALLBACK_CHAT_TEMPLATE
    kwargs = dict(tokenize=False, add_generation_prompt=answer is None, chat_template=template)
    try:
        return tokenizer.apply_chat_template(messages, **kwargs)
    except Exception:  # templates without a system role (e.g. Gemma's) raise; fold it into the user turn
        messages = [{"role": "user", "content": f"{system_prompt}\n\n{user}"}] + messages[2:]
        return tokenizer.apply_chat_template(messages, **kwargs)


def _answer_tokens(tokenizer, system_prompt: str, prompt: str) -> tuple[int, list[list[int]]]:
    """Tokens of each label's answer: what the template appends after the prompt, up to end-of-turn."""
    answers = []
    end_of_turn_id = None
    for label in LABELS:
        full = _render(tokenizer, system_prompt, _SENTINEL, answer=label)
        if not full.startswith(prompt):  # e.g. templates that re-render the assistant header differently
            full = prompt + label + (tokenizer.eos_token or "")
        after = full[len(prompt) :]
        word_end = after.index(label) + len(label)
        ids = tokenizer(after[:word_end], add_special_tokens=False)["input_ids"]
        closing = tokenizer(after[word_end:], add_special_tokens=False)["input_ids"]
        # The end-of-turn token is the first special token after the label; templates that close a turn with
        # plain text only (rare) fall back to the tokenizer's EOS.
        special = set(tokenizer.all_special_ids)
        eot = next((t for t in closing if t in special), tokenizer.eos_token_id)
        assert eot is not None, "the tokenizer has neither an end-of-turn token nor an EOS token"
        end_of_turn_id = eot
        answers.append(ids + [eot])
    return end_of_turn_id, answers


def training_example(prompt_ids: list[int], answer_ids: list[int]) -> tuple[list[int], list[int]]:
    """Input ids and loss targets: the loss covers the answer tokens only."""
    input_ids = prompt_ids + answer_ids
    targets = [IGNORE_INDEX] * len(prompt_ids) + answer_ids
    return input_ids, targets
